# One image for every stage: `broker stage <name> --bootstrap kafka:9092`.
FROM python:3.11-slim
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY broker broker
COPY streams streams
COPY schemas schemas
# Extras: classify (torch, the classify stage), web (`broker serve`, the portal), s3 (s3fs: frame store and archive on s3://, as in
# k8s/config.yaml), postgres (psycopg: the object history in PostgreSQL, [history] dsn).
# Point TORCH_INDEX_URL at a CPU-only torch index to keep the image small; by default pip takes
# torch from the default index (which may bring CUDA libraries).
ARG TORCH_INDEX_URL=""
# astrometry.net with the Tycho-2 index files: the ingest stage solves frames without a WCS, checks
# the others and measures zero points (docs/telescopes.md); without them such frames are
# dead-lettered `no_solver` and header WCSs stay unconfirmed.
RUN apt-get update && apt-get install -y --no-install-recommends astrometry.net astrometry-data-tycho2 \
 && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0; fi \
 && pip install --no-cache-dir -c constraints.txt '.[classify,web,s3,postgres]'  # models and schemas are package data
ENTRYPOINT ["broker"]
