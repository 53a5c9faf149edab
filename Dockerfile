# One image for every stage: `broker stage <name> --bootstrap kafka:9092`.
FROM python:3.11-slim
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY broker broker
COPY streams streams
COPY schemas schemas
# Extras: classify (torch, the classify stage), s3 (s3fs: frame store and archive on s3://, as in
# k8s/config.yaml), postgres (psycopg: the object history in PostgreSQL, [history] dsn).
# Point TORCH_INDEX_URL at a CPU-only torch index to keep the image small; by default pip takes
# torch from the default index (which may bring CUDA libraries).
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0; fi \
 && pip install --no-cache-dir -c constraints.txt '.[classify,s3,postgres]'  # models and schemas are package data
ENTRYPOINT ["broker"]
