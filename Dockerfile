# ocsync: multi-stage build, small non-root runtime image.
#   docker build -t ocsync .
# The runtime image holds the binary and CA certificates only; it runs as
# UID 10001 and needs no writable filesystem besides /tmp.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ocsync \
 && install -D target/release/ocsync /out/ocsync

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ocsync /usr/local/bin/ocsync
USER 10001:10001
EXPOSE 8080 9464
ENTRYPOINT ["/usr/local/bin/ocsync"]
CMD ["serve"]
