# One image for every stage: `broker stage <name> --bootstrap kafka:9092`.
FROM python:3.11-slim
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY broker broker
COPY streams streams
COPY schemas schemas
# Point TORCH_INDEX_URL at a CPU-only torch index to keep the image small; by default pip takes
# torch from the default index (which may bring CUDA libraries).
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0; fi \
 && pip install --no-cache-dir -c constraints.txt '.[classify]'  # models and schemas are package data
ENTRYPOINT ["broker"]
