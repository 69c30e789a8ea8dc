//! [`RetryLayer`]: wraps services in a [`RetryService`].

use std::{fmt, sync::Arc};

use tower_layer::Layer;

use super::{budget::RetryBudget, service::RetryService};

/// What a layer's services and their response futures share: one `Arc`, so a call clones
/// one reference count rather than two.
pub(crate) struct Shared<P> {
    pub(crate) policy: Arc<P>,
    pub(crate) budget: RetryBudget,
}

/// A [`Layer`] that retries failed calls as its [`RetryPolicy`](super::RetryPolicy)
/// says, within a [`RetryBudget`].
///
/// The policy and the budget are created when the layer is built, behind `Arc`s: every
/// service this layer makes, every clone of those, and clones of the layer share them,
/// so per-request clones (hyper-util, axum) draw from one budget.
pub struct RetryLayer<P> {
    policy: Arc<P>,
    budget: RetryBudget,
}

impl<P> RetryLayer<P> {
    /// A layer retrying by `policy`, within a default [`RetryBudget`] (20 % of requests,
    /// plus 10 retries per second, over 10 s) made now.
    pub fn new(policy: P) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
            budget: RetryBudget::new(),
        }
    }

    /// Uses `budget` instead of the default one. Give one budget (cloned) to several
    /// layers to share it between them.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// The budget the layer's services share.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }
}

impl<S, P> Layer<S> for RetryLayer<P> {
    type Service = RetryService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService::from_parts(
            inner,
            Arc::new(Shared {
                policy: self.policy.clone(),
                budget: self.budget.clone(),
            }),
        )
    }
}

impl<P> Clone for RetryLayer<P> {
    fn clone(&self) -> Self {
        RetryLayer {
            policy: self.policy.clone(),
            budget: self.budget.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for RetryLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .field("budget", &self.budget)
            .finish()
    }
}
