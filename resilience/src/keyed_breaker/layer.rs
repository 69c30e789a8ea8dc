//! [`KeyedCircuitBreakerLayer`] and its builder.

use std::{fmt, marker::PhantomData};

use tower_layer::Layer;

use super::{
    error::InvalidKeyedBreaker,
    map::{KeyedCircuitBreakers, DEFAULT_MAX_BREAKERS},
    service::KeyedCircuitBreakerService,
};
use crate::{
    circuit_breaker::{CircuitBreakerBuilder, DefaultClassifier},
    key::{GlobalKey, KeyType},
    mode::{ErrorMode, HttpMode},
};

/// Builds a [`KeyedCircuitBreakerLayer`]: the template of every key's breaker, the key,
/// the key cap. Get one from [`KeyedCircuitBreakerLayer::builder`]. Every setting has a
/// getter of the same name on the layer.
#[derive(Clone, Debug)]
#[must_use = "call .build() to get a KeyedCircuitBreakerLayer"]
pub struct KeyedCircuitBreakerLayerBuilder<E = GlobalKey> {
    template: CircuitBreakerBuilder,
    extractor: E,
    max_keys: usize,
}

impl<E> KeyedCircuitBreakerLayerBuilder<E> {
    /// A breaker per key that `extractor` finds in a request: the same extractors as
    /// the keyed token buckets ([`PeerIp`](crate::PeerIp), [`HeaderKey`](crate::HeaderKey),
    /// [`key_fn`](crate::key_fn)...), and [`UriHost`](crate::UriHost) for clients.
    pub fn key<E2: KeyType>(self, extractor: E2) -> KeyedCircuitBreakerLayerBuilder<E2> {
        KeyedCircuitBreakerLayerBuilder {
            template: self.template,
            extractor,
            max_keys: self.max_keys,
        }
    }

    /// The hard cap on keys (default [`DEFAULT_MAX_BREAKERS`], 10 000); see
    /// [`KeyedCircuitBreakers`] for what is evicted at the cap. 0 is refused by
    /// [`build`](Self::build).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Creates the breakers' map and the layer, in [error mode](ErrorMode).
    ///
    /// # Panics
    ///
    /// When `max_keys` is 0; see [`try_build`](Self::try_build).
    #[track_caller]
    pub fn build(self) -> KeyedCircuitBreakerLayer<E>
    where
        E: KeyType,
    {
        match self.try_build() {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`build`](Self::build), but returns an error instead of panicking.
    pub fn try_build(self) -> Result<KeyedCircuitBreakerLayer<E>, InvalidKeyedBreaker>
    where
        E: KeyType,
    {
        Ok(KeyedCircuitBreakerLayer {
            breakers: KeyedCircuitBreakers::try_new(self.template, self.max_keys)?,
            extractor: self.extractor,
            classifier: DefaultClassifier,
            _mode: PhantomData,
        })
    }
}

/// A [`Layer`] that guards a service with one circuit breaker per key.
///
/// See the [module docs](super) for an example. The breakers are created in a
/// [`KeyedCircuitBreakers`] map when the layer is built, and shared by every service
/// it makes, their clones, and clones of the layer. A request without a key is refused
/// with [`MissingKey`](crate::MissingKey) (HTTP mode: `500`
/// `{"error":"breaker_key_missing",...}`), without reaching the inner service.
///
/// The modes and the classifier are the [`CircuitBreakerLayer`](crate::CircuitBreakerLayer)'s:
/// error mode by default, [`http`](Self::http) for `503` responses, and
/// [`classifier`](Self::classifier) in either order.
pub struct KeyedCircuitBreakerLayer<E: KeyType = GlobalKey, C = DefaultClassifier, M = ErrorMode> {
    extractor: E,
    breakers: KeyedCircuitBreakers<E::Key>,
    classifier: C,
    _mode: PhantomData<fn() -> M>,
}

impl KeyedCircuitBreakerLayer {
    /// Starts building a layer whose breakers are built from `template`.
    pub fn builder(template: CircuitBreakerBuilder) -> KeyedCircuitBreakerLayerBuilder {
        KeyedCircuitBreakerLayerBuilder {
            template,
            extractor: GlobalKey,
            max_keys: DEFAULT_MAX_BREAKERS,
        }
    }
}

impl<E: KeyType, C, M> KeyedCircuitBreakerLayer<E, C, M> {
    /// Uses `classifier` to decide which outcomes are failures, in whichever mode.
    pub fn classifier<C2>(self, classifier: C2) -> KeyedCircuitBreakerLayer<E, C2, M> {
        KeyedCircuitBreakerLayer {
            extractor: self.extractor,
            breakers: self.breakers,
            classifier,
            _mode: PhantomData,
        }
    }

    /// HTTP mode: an open key's request is answered `503` with `Retry-After`, exactly
    /// as [`CircuitBreakerLayer::http`](crate::CircuitBreakerLayer::http) does; the
    /// error type stays the inner one. Keeps the breakers.
    pub fn http(self) -> KeyedCircuitBreakerLayer<E, C, HttpMode> {
        KeyedCircuitBreakerLayer {
            extractor: self.extractor,
            breakers: self.breakers,
            classifier: self.classifier,
            _mode: PhantomData,
        }
    }

    /// The key extractor, as given to [`key`](KeyedCircuitBreakerLayerBuilder::key).
    pub fn key(&self) -> &E {
        &self.extractor
    }

    /// The cap on keys, as given to
    /// [`max_keys`](KeyedCircuitBreakerLayerBuilder::max_keys).
    pub fn max_keys(&self) -> usize {
        self.breakers.max_keys()
    }

    /// The breakers the services of this layer use, by key: to read a key's state, or
    /// to [`force_open`](crate::CircuitBreaker::force_open) one.
    pub fn breakers(&self) -> &KeyedCircuitBreakers<E::Key> {
        &self.breakers
    }
}

impl<S, E: KeyType, C: Clone, M> Layer<S> for KeyedCircuitBreakerLayer<E, C, M> {
    type Service = KeyedCircuitBreakerService<S, E, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreakerService::new(
            inner,
            self.extractor.clone(),
            self.breakers.clone(),
            self.classifier.clone(),
        )
    }
}

impl<E: KeyType, C: Clone, M> Clone for KeyedCircuitBreakerLayer<E, C, M> {
    fn clone(&self) -> Self {
        KeyedCircuitBreakerLayer {
            extractor: self.extractor.clone(),
            breakers: self.breakers.clone(),
            classifier: self.classifier.clone(),
            _mode: PhantomData,
        }
    }
}

impl<E: KeyType + fmt::Debug, C: fmt::Debug, M> fmt::Debug for KeyedCircuitBreakerLayer<E, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("key", &self.extractor)
            .field("breakers", &self.breakers)
            .field("classifier", &self.classifier)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
