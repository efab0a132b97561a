"""What the four DAGs share: where the project is, the data Asset, pools, default_args with the
failure alert, the params.yaml values and choices the trigger forms offer, and the task decorator.

Airflow puts the DAG folder on sys.path, so the DAG files `import dag_support`; .airflowignore
keeps it from being parsed as a DAG. Like the DAG files it imports no pipeline code at the top;
at parse time only `pipeline.choices` (names, no dependencies) is read, so parsing stays fast and
free of torch, MLflow and GX. The tasks call only `pipeline.stages` and the base modules.
"""

from __future__ import annotations

import functools
import inspect
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import yaml
from airflow.sdk import Asset, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTerminated

PROJECT_ROOT = Path(os.environ.get("PIPELINE_ROOT") or Path(__file__).resolve().parents[1])
# Updated by publish_dataset when it records a new data version (its event hands on the version's
# data.dvc entry); the training DAG runs on it. Named, not a path: every host's checkout may
# lie elsewhere, and the scheduler and the workers must name the same Asset.
DATA = Asset(name="pipeline-data")
PROMOTION_POOL = "promotion"  # one slot: `airflow pools set promotion 1 ...` (make run does it)
GPU_POOL = "gpu"  # slots = GPUs on the worker (1 on CPU): one training per device
# What every training task (train, each sweep trial) runs with: a GPU slot, hours of time, and
# under the KubernetesExecutor (others ignore it) a pod on a GPU node.
GPU_TASK = {
    "pool": GPU_POOL,
    "execution_timeout": timedelta(hours=6),
    "executor_config": {
        "pod_template_file": str(PROJECT_ROOT / "infra/helm/gpu-pod-template.yaml")
    },
}


def alert(context) -> None:
    """on_failure_callback: the ALERT log line and webhook of pipeline/alerts.py, imported late."""
    from pipeline.alerts import on_failure

    on_failure(context)


def default_args(**changes) -> dict:
    """Retries with backoff (30 s, then 60 s, at most 10 min apart: a flaky store gets time to
    recover), a timeout, and the failure alert; `changes` for a DAG that needs other values."""
    return {
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=30),
        "on_failure_callback": alert,
        **changes,
    }


def params_yaml() -> dict:
    """params.yaml as written, for the trigger forms' starting values (the one source of
    defaults). A file that does not parse leaves the forms empty; the first task then fails
    with the config error that names the problem."""
    try:
        return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def param(params: dict, dotted: str):
    """A value of params.yaml by its dotted key (None where the file has no such key)."""
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def form_param(default, **schema) -> Param:
    """A trigger-form field starting at `default` (from params.yaml). Where params.yaml gave no
    value (it does not parse), the field also takes null, so a scheduled run still starts and
    its first task fails with the config error and the alert."""
    if default is None:
        if "enum" in schema:
            schema["enum"] = [None, *schema["enum"]]
        if "type" in schema:
            given = schema["type"]
            schema["type"] = ["null", *(given if isinstance(given, list) else [given])]
        if "anyOf" in schema:
            schema["anyOf"] = [{"type": "null"}, *schema["anyOf"]]
    return Param(default, **schema)


@contextmanager
def permanent_errors():
    """Around a task body. Bad config, bad or untracked data, failed validation, divergence, an
    untrusted checkpoint or a model reference that does not resolve will not fix themselves:
    fail, no retry. SIGTERM or SIGINT stops the body (Airflow's runner alone would let it run
    on), its MLflow run ends KILLED, and the task fails as terminated, without retry. MLflow
    refusing the login or this host's name (401/403) fails at once too, saying the fix."""
    from pipeline import interrupts
    from pipeline.errors import PermanentError, mlflow_refusal

    try:
        with interrupts.raising_on_signals():
            yield
    except (PermanentError, LookupError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
    except interrupts.Interrupted as exc:
        raise AirflowTaskTerminated(str(exc)) from exc
    except Exception as exc:
        refused = mlflow_refusal(exc, settings().tracking_uri)
        if refused:
            raise AirflowFailException(refused) from exc
        raise


def preset_param(params: dict, default) -> Param:
    """The form's preset field: a recipe from params.yaml `presets:`, or none."""
    return Param(
        default,
        type=["null", "string"],
        enum=[None, *sorted(params.get("presets") or {})],
        description="a recipe from params.yaml `presets:`; fields you set below win",
    )


def run_params() -> dict:
    """This run's params, for the first task of a DAG. Airflow merges a trigger conf's unknown
    keys into the params instead of refusing them, so a misspelled key (`learning_rate`) would
    be ignored and the run succeed on the defaults: here it fails the task at once, no retry,
    naming the unknown keys and the ones the DAG takes."""
    context = get_current_context()
    params, dag = context["params"], context["dag"]
    unknown = sorted(set(params) - set(dag.params))
    if unknown:
        raise AirflowFailException(
            f"unknown key(s) in the trigger conf: {', '.join(unknown)}; {dag.dag_id} takes "
            f"{', '.join(sorted(dag.params))}"
        )
    return params


def form_config(keys: dict[str, str]):
    """params.yaml with this run's form applied: each field (`keys`: field -> dotted key) that is
    set overrides its key, whatever its value; empty fields leave params.yaml's value, or a
    chosen preset's, alone. Unknown conf keys fail (`run_params`)."""
    from pipeline.config import load_config

    given = run_params()
    overrides = {key: given[name] for name, key in keys.items() if given.get(name) is not None}
    with permanent_errors():
        return load_config(settings().params, overrides)


def empty_note(params: dict, key: str) -> str:
    """What an empty form field means: the value the run then takes."""
    return f"empty: the preset's or params.yaml's ({param(params, key)})"


def choice(key: str, default, **schema) -> Param:
    """A form field choosing a value of the params.yaml `key` from its `pipeline.choices` table
    (the one list of names the config and the CLI accept too)."""
    from pipeline import choices  # names only: no dependencies

    return form_param(default, enum=list(choices.KEYS[key]), **schema)


def context(**changes):
    """The stages' RunContext of this task: which DAG, which run, which try; the next task may
    run on another worker."""
    from pipeline.context import RunContext

    ctx = get_current_context()
    ids = {"dag_id": ctx["dag"].dag_id, "run_id": ctx["run_id"], "try_number": ctx["ti"].try_number}
    return RunContext(origin="airflow", ids=ids, remote_handoffs=True, **changes)


def stage_task(**task_kwargs):
    """@task for a task that runs pipeline code. The body is `body(cfg, settings, ctx, ...)`: it
    gets the config resolved by the run's first task (from the first argument's "config"), the
    settings and the RunContext; the task's own arguments are `checked` and the body's others.
    Where `checked` has "pinned" (the run's data version, `pinned_data`), data/ is checked out
    to it first. PermanentError and LookupError fail it without retries (`permanent_errors`)."""

    def decorate(body):
        @functools.wraps(body)
        def run(checked: dict, *args, **kwargs):
            with permanent_errors():
                here = settings()
                if "pinned" in checked:  # this worker may hold another version, or none
                    from pipeline.stages.validate import checkout_stage

                    checkout_stage(here, checked["pinned"])
                return body(config(checked["config"]), here, context(), *args, **kwargs)

        # Airflow reads the task's arguments from the signature: `checked`, then the body's own.
        own = list(inspect.signature(body).parameters.values())[3:]
        first = inspect.Parameter("checked", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        run.__signature__ = inspect.Signature([first, *own])
        return task(**task_kwargs)(run)

    return decorate


def pinned_data() -> dict:
    """For a DAG's first task (declared with `inlets=[DATA]`): the data version this run works
    on, checked out here; later tasks get it in `checked["pinned"]`. The version of the Asset
    event that triggered the run, else of the newest one (a scheduled run: whatever worker
    published it), else this checkout's data.dvc."""
    from pipeline.stages.validate import checkout_stage, pinned_version

    context = get_current_context()
    triggering = (context.get("triggering_asset_events") or {}).get(DATA) or []
    newest = list(context["inlet_events"][DATA].ascending(False).limit(1))
    published = [event.extra or {} for event in (triggering or newest)]
    with permanent_errors():
        pinned = pinned_version(settings(), published)
        checkout_stage(settings(), pinned)
    return pinned


def settings():
    from dataclasses import replace

    from pipeline.settings import Settings

    # The DAG's runs leave the checkout as committed: their reports/ go to outputs/.
    return replace(Settings.from_env(PROJECT_ROOT), reports_in_git=False)


PREDICT_ROOTS = "PIPELINE_PREDICT_ROOTS"


def predict_roots() -> list[Path]:
    """The folders a batch_predict run may read and write (PIPELINE_PREDICT_ROOTS, ':'-separated;
    default the project's inbox/ and outputs/predictions/, never its records): the trigger
    form's paths must lie under one."""
    listed = os.environ.get(PREDICT_ROOTS, "").split(os.pathsep)
    default = [PROJECT_ROOT / "inbox", PROJECT_ROOT / "outputs" / "predictions"]
    return [Path(p) for p in listed if p.strip()] or default


def config(resolved: dict | None = None):
    """The config a previous task resolved, or params.yaml as it is now."""
    from pipeline.config import load_config, resolved_config

    with permanent_errors():
        return resolved_config(resolved) if resolved else load_config(settings().params)
