"""Publish a dataset version: write data/ from its source, `dvc add` + `dvc push`, and update the
`pipeline-data` Asset, which starts the training DAG (data-aware scheduling).

Nothing changed (same bytes, same md5): the task is skipped and no Asset event is sent. The new
data.dvc is left in the checkout for you to commit: the DAG records versions, git keeps history.
"""

from __future__ import annotations

from datetime import timedelta

import dag_support as ds
import pendulum
from airflow.sdk import dag, get_current_context, task

PARAMS = ds.params_yaml()


@dag(
    dag_id="publish_dataset",
    description="Write a dataset version with DVC and update the pipeline-data Asset",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["data", "dvc"],
    default_args=ds.default_args(retries=1, execution_timeout=timedelta(hours=2)),
    doc_md=__doc__,
    params={
        "dataset": ds.choice("base.dataset", ds.param(PARAMS, "base.dataset")),
        "source_dir": ds.form_param(
            ds.param(PARAMS, "data.source_dir"),
            type="string",
            description="raw files / class folders",
        ),
        "test_fraction": ds.form_param(
            ds.param(PARAMS, "data.test_fraction"), type="number", exclusiveMinimum=0
        ),
    },
)
def publish_dataset():
    @task(outlets=[ds.DATA])
    def publish() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.config import load_config
        from pipeline.stages.publish import publish_stage

        params, settings = ds.run_params(), ds.settings()
        with ds.permanent_errors():
            overrides = {
                "base.dataset": params["dataset"],
                "data.source_dir": params["source_dir"],
                "data.test_fraction": params["test_fraction"],
            }
            cfg = load_config(settings.params, overrides)
            # The version follows the source's content: unchanged files and settings are a no-op.
            published = publish_stage(cfg, settings)
        md5 = published["data_md5"]
        if md5 == published["previous"]:
            raise AirflowSkipException(f"data unchanged ({md5}): no new version, no Asset event")
        # the version's data.dvc entry: the triggered run checks it out on every worker
        event = {"data_md5": md5, "dataset": cfg.base.dataset, "pointer": published["pointer"]}
        get_current_context()["outlet_events"][ds.DATA].extra = event
        return published

    publish()


publish_dataset()
