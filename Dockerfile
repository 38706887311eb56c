# syntax=docker/dockerfile:1
# Multi-stage build: release binary in a full Rust image, run in a slim Debian
# image as a non-root user.

FROM rust:1-slim-bookworm AS build
# --build-arg PGO=1: a profile-guided build (bench/pgo.sh trains the proxy on
# a fake KeyAPI; ~8 min more): a cache hit runs ~20 % fewer instructions and
# 10–20 % faster (docs/performance.md, "Profile-guided builds").
ARG PGO=0
WORKDIR /src
COPY . .
# sharing=locked: compose builds this image once per service that names it, in parallel
# under podman-compose; two cargos unpacking into one registry cache collide.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target \
    if [ "$PGO" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends curl python3 wrk \
      && PGO_ONLY=proxy bash bench/pgo.sh \
      && cp target/pgo/keyapi-proxy /usr/local/bin/keyapi-proxy; \
    else \
      cargo build --release --locked --bin keyapi-proxy \
      && cp target/release/keyapi-proxy /usr/local/bin/keyapi-proxy; \
    fi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin keyapi
COPY --from=build /usr/local/bin/keyapi-proxy /usr/local/bin/keyapi-proxy
COPY config/default.toml /etc/keyapi-proxy/default.toml
USER keyapi
# Listen on all interfaces inside the container; logs as JSON for collectors.
ENV KEYAPI_PROXY__SERVER__LISTEN=0.0.0.0:8080 \
    KEYAPI_PROXY__LOG__FORMAT=json
EXPOSE 8080
# The key comes from KEYAPI_API_KEY or, better, a secret file. Listening on 0.0.0.0,
# the proxy refuses to start without a client token (or an explicit open proxy):
#   docker run --rm keyapi-proxy hash-token     # a token for the client, and its hash
#   docker run -p 8080:8080 \
#     -v "$PWD/keyapi_key:/run/secrets/keyapi_key:ro" -e KEYAPI_API_KEY_FILE=/run/secrets/keyapi_key \
#     -e KEYAPI_PROXY__CLIENTS='[{id="app", token_sha256="<hash>"}]' keyapi-proxy
#   curl -H 'Authorization: Bearer <token>' 'http://127.0.0.1:8080/v1/tiktok/trending/hashtag/detail?hashtag_name=ufc324'
# An open proxy only as a conscious choice: -e KEYAPI_PROXY__SERVER__OPEN=true
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["keyapi-proxy", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["keyapi-proxy"]
CMD ["serve"]
