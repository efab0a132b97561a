-- The MLflow backend store and the sweep DAG's Optuna studies live beside Airflow's metadata DB
-- (created by POSTGRES_DB).
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
