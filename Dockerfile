# Stagewatch service image: the server, its migrations and the dashboard; no torch (workers bring their own).
#
#   docker build -t stagewatch .
#   docker run -e STAGEWATCH_DATABASE_URL=postgresql://user:pass@host:5432/db -p 127.0.0.1:8765:8765 stagewatch
#
# An explicit database is never migrated implicitly: run `stagewatch db upgrade` first (docker-compose.yml has a
# one-shot `migrate` service for that), and create tokens with `stagewatch token create --role worker`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install .` needs: pyproject.toml names these packages and the readme.
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY migrations /src/migrations
COPY web /src/web
COPY trainer /src/trainer
RUN pip install /src && rm -rf /src

# Unprivileged user; its home holds the embedded SQLite file when no STAGEWATCH_DATABASE_URL is given.
RUN useradd --create-home --uid 10001 --user-group stagewatch
USER stagewatch
WORKDIR /home/stagewatch

EXPOSE 8765

# Listens beyond loopback, so authentication stays on (the server refuses --no-auth here without
# --allow-insecure-bind). The database comes from STAGEWATCH_DATABASE_URL.
CMD ["stagewatch", "serve", "--host", "0.0.0.0", "--port", "8765"]
