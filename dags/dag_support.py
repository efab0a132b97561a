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
GPU_POOL = "gpu"  # slots = GPUs of the training workers (1 on CPU): one training per device
# The Celery queue the training hosts' workers serve (Airflow's default queue when unset).
TRAIN_QUEUE = os.environ.get("PIPELINE_TRAIN_QUEUE", "")
# What every training task (train and train_peer, each sweep trial, compress) runs with: a GPU
# slot, hours of time, the training queue, and under the KubernetesExecutor (which ignores
# queues) a pod on a GPU node.
GPU_TASK = {
    "pool": GPU_POOL,
    "execution_timeout": timedelta(hours=6),
    "executor_config": {
        "pod_template_file": str(PROJECT_ROOT / "infra/helm/gpu-pod-template.yaml")
    },
    **({"queue": TRAIN_QUEUE} if TRAIN_QUEUE else {}),
}

# Training on several machines (the form's `nodes`): the train task is the first machine and
# opens the rendezvous; `train_peer`, mapped over the others, joins it, each a training task.
RENDEZVOUS = "rendezvous"  # the XCom key under which train publishes where to meet


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


def training_nodes(cfg) -> dict:
    """The form's `nodes` x `nproc_per_node`, for the run's first task: {"nnodes", "nproc"}.
    A recipe torchrun does not run fails here."""
    params = get_current_context()["params"]
    nnodes, nproc = params.get("nodes") or 1, params.get("nproc_per_node") or 1
    if nnodes * nproc > 1:
        from pipeline.stages.nodes import require_distributable

        join_timeout_s()  # a bad value fails now, not after validation
        with permanent_errors():
            require_distributable(cfg)
    return {"nnodes": nnodes, "nproc": nproc}


def join_timeout_s() -> int:
    """How long the machines of a training wait for each other: PIPELINE_JOIN_TIMEOUT_S (600 s);
    a value that is not a positive whole number fails the task, naming it."""
    given = os.environ.get("PIPELINE_JOIN_TIMEOUT_S") or "600"
    if not given.isdigit() or int(given) < 1:
        raise AirflowFailException(
            f"PIPELINE_JOIN_TIMEOUT_S={given!r}: give the seconds the machines of a training wait "
            "for each other as a whole number >= 1 (default 600)"
        )
    return int(given)


def _too_few(nnodes: int) -> str:
    queue = TRAIN_QUEUE or "the default queue"
    return (
        f". Each machine is a train or train_peer task of this run, on {queue} with a slot of "
        f"pool {GPU_POOL}: run {nnodes} workers on that queue, one per machine "
        f"(--concurrency 1), and give the pool {nnodes} slots (infra/README.md, Training on "
        "several machines)"
    )


def lead_training(cfg, settings, ctx, validation: dict, nodes: dict) -> dict:
    """The train task on several machines: open a rendezvous on this worker (its address and a
    free port, an id naming this DAG run and try), publish it for the `train_peer` tasks, and
    train as one of the machines; returns the train stage's result (rank 0's). Ending, it
    closes the rendezvous: for the next try, or for good (the peers then stop at once)."""
    from dataclasses import asdict

    from pipeline.errors import PermanentError
    from pipeline.stages.nodes import machines, rendezvous, train_on_nodes

    ti = get_current_context()["ti"]
    meeting = {
        **rendezvous(f"{ctx.attempt()}.try{ti.try_number}"),
        "context": asdict(ctx),  # every machine's rank 0 records this try, whichever it is
    }
    here = machines(nodes, meeting, is_host=True, join_timeout_s=join_timeout_s())
    ti.xcom_push(RENDEZVOUS, meeting)
    closed: dict = {}  # a peer's retry waits for the next try's
    try:
        return train_on_nodes(cfg, settings, validation, ctx, here, _too_few(nodes["nnodes"]))
    except Exception as exc:
        if isinstance(exc, PermanentError) or ti.try_number > ti.task.retries:
            closed = {"gave_up": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        ti.xcom_push(RENDEZVOUS, closed)


def join_training(cfg, settings, validation: dict, nodes: dict, node: int) -> dict:
    """A train_peer task: wait (up to `join_timeout_s`) for the rendezvous the train task of
    this run opens, then train as one of its machines with the train task's context. A
    rendezvous that closed before this machine came (an earlier try's) is left for the next;
    when the train task gave up for good, this one is skipped (the run failed already)."""
    import time

    from airflow.sdk.exceptions import AirflowSkipException

    from pipeline.context import RunContext
    from pipeline.stages.nodes import NodesDidNotMeet, machines, train_on_nodes

    ti, waited, missed = get_current_context()["ti"], join_timeout_s(), None
    deadline = time.monotonic() + waited
    while time.monotonic() < deadline:
        meeting = ti.xcom_pull(task_ids="train", key=RENDEZVOUS, map_indexes=-1)
        if meeting and "gave_up" in meeting:
            raise AirflowSkipException(f"the train task gave up: {meeting['gave_up']}")
        if not meeting or meeting == missed:
            time.sleep(2)
            continue
        here = machines(nodes, meeting, is_host=False, join_timeout_s=waited)
        ctx = RunContext(**meeting["context"])
        try:
            return train_on_nodes(cfg, settings, validation, ctx, here, _too_few(nodes["nnodes"]))
        except NodesDidNotMeet:
            missed = meeting
    raise AirflowFailException(
        f"machine {node}: no rendezvous of this run's train task to join within "
        f"{waited} s (PIPELINE_JOIN_TIMEOUT_S){_too_few(nodes['nnodes'])}"
    )
