# Production-shaped image for the wallet service: API (gunicorn), Celery worker/beat, Flower.
FROM python:3.11.10-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 wallet \
    && useradd --system --uid 10001 --gid wallet --home-dir /app --no-create-home wallet \
    && mkdir /metrics && chown wallet:wallet /metrics

WORKDIR /app

COPY requirements/base.txt requirements/base.txt
RUN pip install --no-cache-dir -r requirements/base.txt

COPY api/ api/
COPY worker/ worker/
COPY common/ common/
COPY migrations/ migrations/
COPY alembic.ini alembic.ini
COPY gunicorn.conf.py gunicorn.conf.py

USER wallet

EXPOSE 8080 5555

# No image-level HEALTHCHECK: worker/beat/flower share this image and serve nothing on
# :8080; the API's health check lives in docker-compose.yml.

CMD ["gunicorn", "api:create_app()", "--bind", "0.0.0.0:8080", "--workers", "2"]
