"""The stages, one module each: plain functions `(config, settings, inputs) -> small JSON-able
dict` that the CLI, dvc.yaml and the Airflow DAGs all call, so the three ways to run give the same
results. What one stage hands the next is a reference (data md5, MLflow run id), never data.
Each module imports its heavy libraries inside the functions, so importing one is cheap."""
