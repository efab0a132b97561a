"""The MLflow model's code file (models from code): MLflow runs it when it loads the model, with
the bundled package on sys.path. Never imported by the pipeline itself."""

from mlflow.models import set_model

from pipeline.tracking.served import ImageClassifier

set_model(ImageClassifier())
