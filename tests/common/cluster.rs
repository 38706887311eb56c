//! Two replicas of the proxy on one real `redis-server`, sharing the fake
//! KeyAPI and one manual clock (so the whole cluster's time moves at once).

use std::sync::Arc;

use keyapi_proxy::{clock::ManualClock, config::Config};

use super::{
    TestApp, manual_clock,
    redis_server::{RedisServer, with_redis},
    spawn_app_with_clock,
};

/// Replicas `a` and `b` on `redis`, counting time with `clock`. Dropping
/// `redis` stops the server: keep it bound when taking the cluster apart, or
/// borrow the replicas (`let Cluster { a, b, .. } = &cluster;`).
pub struct Cluster {
    pub redis: RedisServer,
    pub clock: Arc<ManualClock>,
    pub a: TestApp,
    pub b: TestApp,
}

impl Cluster {
    /// Both replicas configured by `adjust` after the Redis tier is set;
    /// `None` (the test skips, loudly) without a `redis-server`.
    pub async fn start(adjust: impl Fn(&mut Config)) -> Option<Self> {
        let redis = RedisServer::start().await?;
        let clock = manual_clock();
        let url = redis.url();
        let config = |c: &mut Config| {
            with_redis(&url)(c);
            adjust(c);
        };
        let a = spawn_app_with_clock(clock.clone(), config).await;
        let b = a.spawn_replica_with_clock(clock.clone(), config).await;
        Some(Self { redis, clock, a, b })
    }
}
