# gradwatch server image: `docker compose up` (see docker-compose.yml and README).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY clip ./clip
COPY agent ./agent
COPY server ./server
COPY dashboard ./dashboard
RUN pip install '.[postgres]'

# The SQLite database lives on a volume so it survives the container.
RUN mkdir -p /data
VOLUME ["/data"]
ENV GRADWATCH_DB=sqlite:////data/gradwatch.db

EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=2)"]

# Inside a container the server must listen on all interfaces; the host port
# mapping in docker-compose.yml keeps it on 127.0.0.1 of the host by default.
CMD ["gradwatch", "serve", "--host", "0.0.0.0", "--port", "8765"]
