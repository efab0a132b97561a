"""The stages, one module each: plain functions `(config, settings, inputs, ctx) -> small
JSON-able dict` that the CLI, dvc.yaml and the Airflow DAGs all call through `graph.run`, so the
three ways to run give the same results; `graph.py` declares which stages exist and what each
hands the next: a reference (data md5, MLflow run id), never data. Each module imports its heavy
libraries inside the functions, so importing one is cheap."""
