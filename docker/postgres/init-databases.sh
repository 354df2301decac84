#!/usr/bin/env bash
# Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d):
# one role and one database each for Airflow, MLflow and the aggregator. The passwords come
# from the container's environment (docker-compose.yml interpolates them from .env).
# Changing a password in .env later does not change it here: ALTER ROLE, or drop the volume.
set -euo pipefail

create_database() {
    local name=$1 password=$2
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -v name="$name" -v password="$password" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'password';
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
}

create_database airflow "${AIRFLOW_DB_PASSWORD:?}"
create_database mlflow "${MLFLOW_DB_PASSWORD:?}"
create_database fedfraud "${AGGREGATOR_DB_PASSWORD:?}"
