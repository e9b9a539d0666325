# MLflow tracking server: PostgreSQL backend store (psycopg2) and S3 artifacts (boto3).
#   docker build -f docker/mlflow.Dockerfile -t kdflow/mlflow:3.17.2 docker/
FROM python:3.11-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir \
        "mlflow==${MLFLOW_VERSION}" \
        "psycopg2-binary==2.9.13" \
        "boto3==1.43.11" \
    && useradd --uid 1000 --gid 100 --no-create-home --home-dir /tmp mlflow

USER 1000:100
WORKDIR /tmp
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health')"]
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
