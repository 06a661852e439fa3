# The image of compose.yaml: sdengine with the HTTP server, the queue and the CUDA runtimes.
# (Not built in this project's CI: no container runtime there. The PyPI torch wheel for Linux x86_64 is the
# CUDA build; onnxruntime-gpu brings the CUDA execution provider.)
FROM python:3.12-slim
RUN useradd --create-home sdengine
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY engine engine
COPY export export
COPY api_compat api_compat
COPY benchmarks benchmarks
COPY cli cli
RUN pip install --no-cache-dir ".[server,queue,gpu]"
USER sdengine
ENV OMP_NUM_THREADS=1
