"""`vitrine`: the command line of the platform (Typer)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from components.config import (
    HEADLINE_METRICS,
    PROJECT_ROOT,
    ConfigError,
    configure_environment,
    load_params,
    state_paths,
)
from vitrine.children import run_children

app = typer.Typer(
    help="vitrine: visual search for e-commerce, and the loop that keeps it good.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stage_app = typer.Typer(help="Run one stage of the loop on ./work (what `dvc repro` calls).")
app.add_typer(stage_app, name="stage")
ab_app = typer.Typer(help="The online A/B between champion and challenger (serving.ab).")
app.add_typer(ab_app, name="ab")
index_app = typer.Typer(help="The champion's catalogue index: refresh it without retraining.")
app.add_typer(index_app, name="index")

JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")]

# Piped or captured (a log, `| grep`, CliRunner, subprocess) there is no terminal width: rich would
# fall back to 80 columns and wrap a table row or a long message into pieces. There it lays out this
# wide instead (tables keep their natural width, text is not padded): each line stays one line.
PIPE_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr): colour and the terminal's width in a terminal;
    otherwise no ANSI codes (rich's default) and PIPE_WIDTH. Emoji codes are left alone."""
    out = Console(stderr=stderr, emoji=False, highlight=False)
    if not out.is_terminal:
        out.width = PIPE_WIDTH
    return out


console = make_console()
err = make_console(stderr=True)


@app.callback()
def _setup() -> None:
    # Rich decides colour when a console is made: make them for this invocation's streams
    # (CliRunner swaps sys.stdout and sys.stderr after this module is imported).
    global console, err
    console, err = make_console(), make_console(stderr=True)
    configure_environment(state_paths())
    try:  # a bad params.yaml is one line naming the key, before any command starts
        load_params()
    except ConfigError as exc:
        fail(str(exc), 2)


def say(text: str, style: str | None = None) -> None:
    """One line on stdout, exactly as written (no rich markup), in `style` in a terminal."""
    console.print(Text(text, style=style or ""))


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(Text(f"error: {message}", style="red"))
    raise typer.Exit(code)


def make_table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    """A borderless table with a ruled header; the `right` columns are right-aligned."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left")
    return table


def emit(data: dict | None, json_path: Path | None, as_json: bool = False) -> None:
    text = json.dumps(data, indent=2, default=str)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    if as_json:
        typer.echo(text)


def _context(work: Path | None = None):
    from components.stages.context import RunContext

    paths = state_paths()
    return RunContext(load_params(), paths, work=(work or PROJECT_ROOT / "work").resolve())


@app.command()
def ingest(
    source: Annotated[
        str | None, typer.Option(help="'fashion-mnist' or PATH/catalogue.csv")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Ingest a catalogue into data/catalogue (images + manifest.parquet), tracked by DVC."""
    from components.data.catalogue import CatalogueError
    from components.stages import ingest as ingest_stage

    try:
        result = ingest_stage.run(_context(), source)
    except CatalogueError as exc:
        fail(str(exc), 2)
    say(f"ingested {result['ingested']} products; data version {result['data_version']}")
    emit(result, json_path)


@app.command()
def run(
    limit: Annotated[int | None, typer.Option(help="Stratified slice of N products.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    cause: Annotated[str, typer.Option(help="Why this run happens (tagged).")] = "manual",
    force: Annotated[
        bool, typer.Option("--force", help="Retrain even when data and params are unchanged.")
    ] = False,
    json_path: JsonOpt = None,
) -> None:
    """The whole retrain flow (Prefect): validate through gate; promotes only a first champion.

    validate → clean labels → train → evaluate → register → gate → (first champion only) promote.
    On the data and params of an already gated version it says "unchanged since version N"
    and registers nothing; --force retrains from scratch.
    """
    from components.stages.summary import format_summary
    from flows.retrain import retrain

    started = time.time()
    try:
        summary = retrain(limit=limit, epochs=epochs, cause=cause, force=force)
    except Exception as exc:  # the flow already logged the traceback; say it plainly
        fail(f"retrain failed: {type(exc).__name__}: {exc}")
    summary["wall_seconds"] = round(time.time() - started, 1)
    say(format_summary(summary))
    emit(summary, json_path)


GATE_LABELS = {True: ("passed", "green"), False: ("failed", "red"), None: ("not gated", "dim")}


def _registry():
    from components.release.registry import open_registry

    return open_registry(state_paths(), load_params())


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Champion and challenger: versions, metrics, gate verdict, approval, data version."""
    from components.release.registry import RegistryUnavailable

    try:
        data = _registry().status()
    except RegistryUnavailable as exc:
        fail(str(exc))
    if as_json:
        emit(data, None, as_json=True)
        return
    from components.release.gate import read_gate_passed

    table = make_table(
        "role", "version", *HEADLINE_METRICS, "gate", "approval", right=HEADLINE_METRICS
    )
    for role in ("champion", "challenger"):
        info = data.get(role)
        if not info:
            table.add_row(role, "none", *["-"] * len(HEADLINE_METRICS), "-", "-")
            continue
        metrics = info.get("metrics", {})
        if role == "challenger":
            passed = (info.get("gate") or {}).get("passed")
            approval = info.get("approval") or "-"
        else:  # the champion's own recorded verdict; approved_by is absent for a bootstrap one
            passed = read_gate_passed(info.get("tags", {}))
            approval = f"approved by {info['approved_by']}" if info.get("approved_by") else "-"
        table.add_row(
            role,
            info["version"],
            *(f"{metrics[k]:.4f}" if k in metrics else "-" for k in HEADLINE_METRICS),
            Text(*GATE_LABELS[passed]),
            Text(approval, style="yellow" if approval == "pending" else ""),
        )
    console.print(table)
    shopper_table = _shopper_table(data)
    if shopper_table is not None:
        console.print(shopper_table)
    for role in ("champion", "challenger"):  # the detector on the held-out scenes
        m = (data.get(role) or {}).get("metrics", {})
        if "detect_map50" in m:
            say(
                f"{role}'s detector: mAP@0.5 {m['detect_map50']:.4f}, item accuracy "
                f"{m.get('detect_item_accuracy', float('nan')):.4f}, item Recall@1 "
                f"{m.get('detect_item_recall_at_1', float('nan')):.4f} (held-out scenes)"
            )
    challenger = data.get("challenger") or {}
    reasons = (challenger.get("gate") or {}).get("reasons", [])
    if reasons:
        say(f"gate reasons for challenger version {challenger['version']}:")
        for reason in reasons:
            say(f"  - {reason}")
    say(f"previous champion: {data.get('previous_champion') or 'none'}")
    say(f"data version: {data.get('data_version') or 'unknown'}")
    index = (data.get("champion") or {}).get("index") or {"revision": 0}
    if index["revision"]:  # refreshed by `vitrine index refresh`
        say(
            f"champion's index: revision {index['revision']} ({index['size']} products, built "
            f"{index['built_at'][:19].replace('T', ' ')} UTC by {index['by']})"
        )
    if refused := data.get("champion_refused"):
        console.print(Text(f"REFUSED: {refused}", style="bold red"))


def _shopper_table(data: dict):
    """Accuracy / Recall@1 per shift of the shopper-style set, champion beside challenger;
    None when neither version has shopper-style results."""
    from components.config import SHOPPER_SHIFTS

    roles = [r for r in ("champion", "challenger") if (data.get(r) or {}).get("metrics")]
    metrics = {r: data[r]["metrics"] for r in roles}
    shifts = [
        s for s in SHOPPER_SHIFTS if any(f"shopper_{s}_accuracy" in m for m in metrics.values())
    ]
    if not shifts:
        return None
    columns = [f"{r} v{data[r]['version']} acc / R@1" for r in roles]
    table = make_table("shopper-style shift", *columns, right=columns)

    def cell(m: dict, prefix: str) -> str:
        acc, recall = m.get(f"{prefix}accuracy"), m.get(f"{prefix}recall_at_1")
        return "-" if acc is None or recall is None else f"{acc:.4f} / {recall:.4f}"

    table.add_row("in-domain (test split)", *(cell(metrics[r], "") for r in roles))
    for shift in shifts:
        table.add_row(shift, *(cell(metrics[r], f"shopper_{shift}_") for r in roles))
    return table


@app.command()
def approve(
    version: str,
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            help="Who approves: a model owner (params.yaml promotion.owners). "
            "Default: the MLflow account in MLFLOW_TRACKING_USERNAME.",
        ),
    ] = None,
) -> None:
    """Approve a gated version as an owner (same as tagging approved_by=NAME in the MLflow UI).

    Through a tracking server with authentication (VITRINE_TRACKING_URI=http://…), the call
    runs as MLFLOW_TRACKING_USERNAME, whose account must be an owner's (EDIT on the model).
    """
    from components.release.registry import PromotionRefused, RegistryUnavailable

    account = os.environ.get("MLFLOW_TRACKING_USERNAME")
    by = by or account
    if not by:
        fail("who approves? --by NAME (a model owner listed in params.yaml promotion.owners)", 2)
    if account and by != account:
        fail(f"logged in to MLflow as {account!r}: an approval is made as oneself, not as {by!r}")
    try:
        _registry().approve(version, by)
    except (PromotionRefused, RegistryUnavailable) as exc:
        fail(str(exc))
    say(f"version {version} approved by {by}; `vitrine promote` makes it champion")


users_app = typer.Typer(help="Accounts on the MLflow server `vitrine ui` runs (login required).")
app.add_typer(users_app, name="users")


@users_app.command("add")
def users_add(
    name: str,
    owner: Annotated[
        bool,
        typer.Option(
            "--owner",
            help="A model owner: may set approved_by (EDIT on the model). The name must be "
            "listed in params.yaml promotion.owners.",
        ),
    ] = False,
    password: Annotated[
        str | None,
        typer.Option(help="At least 12 characters. Default: a random one, printed once."),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="The MLflow server. Default: where `vitrine ui` runs.")
    ] = None,
) -> None:
    """Create an MLflow account (every account may look; only owners may approve).

    With --owner an existing account is made an owner. Uses the admin credentials that the
    first `vitrine ui` wrote to the state folder's auth/admin.json; the server must be running.
    """
    import secrets

    from components.config import ACCOUNT_NAME
    from components.release.accounts import ADMIN, AccountsClient, AccountsError, recorded_url

    params, paths = load_params(), state_paths()
    promotion = params.promotion
    if not ACCOUNT_NAME.fullmatch(name) or name == ADMIN:
        fail(f"{name!r}: an account name is letters, digits and . _ @ - (and not {ADMIN!r})", 2)
    if owner and name == promotion.loop_account:
        fail(f"{name!r} is the loop's own account (promotion.loop_account): never an owner", 2)
    if owner and name not in promotion.owners:
        fail(
            f"{name!r} is not listed in params.yaml promotion.owners "
            f"({', '.join(promotion.owners) or 'none listed'}): list the name there first, so "
            "that only accounts whose approval counts can set approved_by",
            2,
        )
    url = url or recorded_url(paths.auth) or "http://127.0.0.1:5000"
    try:
        client = AccountsClient(url, paths.auth / "admin.json")
        exists = client.user_exists(name)
        if exists and not owner:
            fail(f"account {name!r} already exists on {url}")
        if not exists:
            chosen = password or secrets.token_urlsafe(12)
            client.create_user(name, chosen)
            say(f"created account {name!r} on {url}")
            if password is None:
                say(f"password: {chosen}  (shown once)")
        if owner:
            client.grant_owner(name, params.registry.model_name)
            say(f"{name!r} is an owner: may set approved_by on {params.registry.model_name}")
        else:
            say(f"{name!r} may look, not approve (params.yaml promotion.owners + --owner for that)")
    except AccountsError as exc:
        fail(str(exc))


@app.command()
def promote(
    version: Annotated[str | None, typer.Argument(help="Default: newest approved.")] = None,
) -> None:
    """Move `champion` to an approved version that passed the gate (audited)."""
    from components.release.registry import PromotionRefused, RegistryUnavailable
    from components.stages import promote as promote_stage

    ctx = _context()
    try:
        record = promote_stage.run(ctx, version)
    except (PromotionRefused, RegistryUnavailable) as exc:
        fail(str(exc))
    if record is None:
        say("nothing to promote: no approved version that passed the gate")
        return
    say(
        f"champion: {record['from'] or 'none'} → {record['to']} "
        f"(approved by {record.get('approved_by')})"
    )


@app.command()
def rollback(
    to: Annotated[str | None, typer.Option(help="Default: the previous champion.")] = None,
) -> None:
    """Move `champion` back to the previous champion (or --to VERSION), audited."""
    from components.release.registry import PromotionRefused, RegistryUnavailable

    try:
        record = _registry().rollback(to)
    except (PromotionRefused, RegistryUnavailable) as exc:
        fail(str(exc))
    say(f"champion: {record['from']} → {record['to']} (rollback)")


@index_app.command("refresh")
def index_refresh(
    source: Annotated[
        str | None, typer.Option(help="Default: data.source ('fashion-mnist' or a CSV).")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """New, changed and delisted products into the champion's index, without retraining.

    The source is compared with the index the service serves; new and changed rows are
    validated like ingest's (bad ones quarantined) and embedded with the champion's own model;
    the result is published as the next index revision of the same model version (audited),
    and the service swaps to it within serving.poll_seconds. Nothing changed: nothing is
    published.
    """
    from components.data.catalogue import CatalogueError
    from components.release.registry import PromotionRefused, RegistryUnavailable
    from components.retrieval.revisions import RefreshRefused
    from flows.refresh import refresh

    try:
        result = refresh(source=source)
    except (CatalogueError, RefreshRefused) as exc:
        fail(str(exc), 2)
    except (PromotionRefused, RegistryUnavailable) as exc:
        fail(str(exc))
    except Exception as exc:  # the flow already logged the traceback; say it plainly
        fail(f"index refresh failed: {type(exc).__name__}: {exc}")
    say(refresh_summary(result))
    emit(result, json_path)


def refresh_summary(result: dict) -> str:
    """One paragraph on what `vitrine index refresh` did."""
    if "version" not in result:
        return result["reason"]
    planned = result["planned"]
    bad = result["quarantined"]
    quarantined = f"; {bad} quarantined {result['quarantined_by_reason']}" if bad else ""
    if not result["published"]:
        return (
            f"the index of version {result['version']} is current (revision "
            f"{result['revision']}): {planned['unchanged']} products unchanged{quarantined}"
        )
    return (
        f"version {result['version']}: index revision {result['revision']} published "
        f"({result['size']} products: {result['added']} added, {result['changed']} changed, "
        f"{result['removed']} delisted{quarantined}) in {result['seconds']} s; the service "
        "swaps to it at its next registry poll (serving.poll_seconds)"
    )


def worker_env(env: dict[str, str], workers: int, gpus: int = 0) -> dict[str, str]:
    """The environment of `bentoml serve` with `workers` processes (0: the service's default,
    one per core) and `gpus` GPUs requested (serving.device on cuda), through BentoML's JSON
    override variable (merged with one already set)."""
    overrides = json.loads(env.get("BENTOML_CONFIG_OVERRIDES") or "{}")
    service = overrides.setdefault("services", {}).setdefault("vitrine", {})
    if workers > 0:
        service["workers"] = workers
    if gpus > 0:
        service.setdefault("resources", {})["gpu"] = gpus
    if service:
        env["BENTOML_CONFIG_OVERRIDES"] = json.dumps(overrides)
    return env


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Default: serving.port in params.yaml.")] = None,
    host: Annotated[str | None, typer.Option(help="Default: serving.host (127.0.0.1).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="Service processes. Default: serving.workers (0 = one per core)."),
    ] = None,
) -> None:
    """Serve the champion and its index with BentoML (API, metrics and the web page)."""
    from components.model.device import DeviceError, resolve_device

    serving = load_params().serving
    host, port = host or serving.host, port or serving.port
    try:  # VITRINE_DEVICE overrides serving.device, as in the service (bentos/settings.py)
        device = resolve_device(
            os.environ.get("VITRINE_DEVICE") or serving.device, None, key="serving.device"
        )
    except DeviceError as exc:  # a setting this machine cannot meet: a config error
        fail(str(exc), code=2)
    bentoml = Path(sys.executable).parent / "bentoml"
    say(
        f"serving the champion on http://{host}:{port}/ (page), "
        f"http://{host}:{port}/readyz (model version); Ctrl-C stops"
    )
    code = run_children(
        [[str(bentoml), "serve", "bentos.service:Vitrine", "--host", host, "--port", str(port)]],
        env=worker_env(
            dict(os.environ),
            serving.workers if workers is None else workers,
            gpus=1 if device.type == "cuda" else 0,
        ),
        cwd=PROJECT_ROOT,
    )
    raise typer.Exit(code)


@ab_app.command("report")
def ab_report(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    version: Annotated[str | None, typer.Option(help="Challenger version to judge.")] = None,
) -> None:
    """Per arm: requests, error rate, latency, confidence, agreement; and the A/B verdict.

    Agreement is measured on shadowed requests; the verdict says whether the A/B period
    satisfies the promotion policy.
    """
    from components.serving.ab import ab_verdict, read_ab_log, summarise_arms

    params, paths = load_params(), state_paths()
    summary = summarise_arms(read_ab_log(paths.home / "requests"))
    versions = [a["model_version"] for a in summary["arms"].values() if a["arm"] == "challenger"]
    version = version or (max(versions, key=int) if versions else None)
    passed, reasons = (
        ab_verdict(summary, version, params.serving.ab)
        if version
        else (False, ["no challenger traffic recorded: set serving.ab.mode to route or shadow"])
    )
    summary["verdict"] = {"challenger": version, "passed": passed, "reasons": reasons}
    if as_json:
        return emit(summary, None, as_json=True)
    if summary["arms"]:
        numbers = ("requests", "error rate", "p50 ms", "p95 ms", "confidence", "agreement")
        table = make_table("arm", *numbers, right=numbers)
        for name, arm in summary["arms"].items():
            conf, agree = arm["mean_confidence"], arm["agreement"]
            table.add_row(
                name,
                str(arm["requests"]),
                f"{arm['error_rate']:.3f}",
                f"{arm['p50_ms']:.1f}",
                f"{arm['p95_ms']:.1f}",
                "-" if conf is None else f"{conf:.3f}",
                "-" if agree is None else f"{agree:.3f}",
            )
        console.print(table)
    else:
        say(f"no A/B requests logged under {paths.home / 'requests'}")
    console.print(
        Text.assemble(
            f"A/B gate for v{version}: " if version else "A/B gate: ",
            ("PASSED", "bold green") if passed else ("NOT YET", "yellow"),
        )
    )
    for reason in reasons:
        say(f"  - {reason}")


@app.command()
def ui(
    mlflow_port: int = 5000,
    prefect_port: int = 4200,
    evidently_port: int = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: other hosts).")] = (
        "127.0.0.1"
    ),
    backend_store_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow's store, e.g. postgresql://… Default: the state folder's SQLite."
        ),
    ] = None,
    artifacts_destination: Annotated[
        str | None,
        typer.Option(
            help="Where the server keeps the artifacts it proxies. Default: <state>/artifacts."
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Stay in the foreground until Ctrl-C.")] = True,
) -> None:
    """Start the MLflow UI (login required), the Prefect server and Evidently's UI.

    MLflow runs with its authentication app: anonymous calls get a 401. The first start
    creates the admin account (credentials in the state folder's auth/admin.json, mode 0600);
    `vitrine users add NAME --owner` creates the owners who approve. It serves the artifacts
    (proxied): other hosts need only its URL and an account (docs/scale.md). Evidently's UI
    shows the state folder's drift workspace: each `vitrine drift` run's snapshot, and a
    dashboard of every signal's score over time (docs/monitoring.md).
    """
    from components.release.accounts import AccountsError, prepare_auth, record_url

    paths = state_paths()
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    try:
        auth = prepare_auth(paths.auth)
    except AccountsError as exc:
        fail(str(exc))
    url = f"http://127.0.0.1:{mlflow_port}"  # the admin's own calls (vitrine users) stay local
    record_url(paths.auth, url)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_HOME": str(paths.prefect_home), **auth.server_env()}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # GenAI jobs: 7 idle processes
    mlflow_server = [str(bin_dir / "mlflow"), "server", "--app-name", "basic-auth"]
    mlflow_server += ["--backend-store-uri", backend_store_uri or paths.embedded_tracking_uri]
    mlflow_server += ["--serve-artifacts", "--artifacts-destination"]
    mlflow_server += [artifacts_destination or str(paths.artifacts)]
    mlflow_server += ["--host", host, "--port", str(mlflow_port), "--workers", "1"]
    prefect_server = [str(bin_dir / "prefect"), "server", "start", "--host", host]
    prefect_server += ["--port", str(prefect_port)]
    paths.evidently_workspace.mkdir(parents=True, exist_ok=True)
    evidently_ui = [str(bin_dir / "evidently"), "ui", "--workspace", str(paths.evidently_workspace)]
    evidently_ui += ["--host", host, "--port", str(evidently_port)]  # DO_NOT_TRACK is set
    if auth.created:
        say(f"created the MLflow admin account: credentials in {auth.admin_file} (mode 0600)")
    say(f"MLflow UI   {url}  (log in; owners approve: tag approved_by=NAME on a version)")
    say(f"            admin credentials: {auth.admin_file}; accounts: `vitrine users add NAME`")
    say(f"Prefect UI  http://127.0.0.1:{prefect_port}")
    say(f"Evidently   http://127.0.0.1:{evidently_port}  (drift over time: `vitrine drift` runs)")
    servers = [mlflow_server, prefect_server, evidently_ui]
    raise typer.Exit(run_children(servers, env=env, wait=wait))


@app.command()
def drift(
    since: Annotated[
        str | None,
        typer.Option(
            help="Window start: a duration back from now (30m, 1h, 2d) or an ISO time. "
            "Default: monitoring.window_hours."
        ),
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Drift of the champion's logged requests vs its reference (Evidently).

    Prints the verdict first, writes a report under the state folder's reports/; exit 0 no
    drift, 1 drift, 2 no verdict (too few samples) or error.
    """
    from datetime import UTC, datetime

    from monitoring.drift import run_drift
    from monitoring.window import parse_since

    try:
        start = parse_since(since, datetime.now(UTC)) if since else None
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        result = run_drift(state_paths(), load_params(), since=start)
    except Exception as exc:  # exit 1 means drift: any failure must be 2 (no verdict)
        fail(f"drift check failed: {type(exc).__name__}: {exc}", 2)
    say(result.headline, {0: "green", 1: "bold red"}.get(result.exit_code, "yellow"))
    if result.report_html:
        say(f"report: {result.report_html}")
        say(f"all reports: {result.report_html.parent.parent / 'index.html'}")
    emit(
        {
            "drifted": result.drifted,
            "exit_code": result.exit_code,
            "headline": result.headline,
            "report_html": result.report_html,
            "report_json": result.report_json,
            "details": result.details,
        },
        json_path,
    )
    raise typer.Exit(result.exit_code)


@app.command()
def simulate(
    shift: Annotated[
        str,
        typer.Option(help="none, brightness, darken, rotate, blur, noise, crop or new-category"),
    ] = "none",
    n: Annotated[int, typer.Option("--n", help="Requests to send.", min=1)] = 500,
    url: Annotated[
        str | None, typer.Option(help="Default: http://serving.host:serving.port")
    ] = None,
    seed: int = 0,
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 8,
    endpoint: Annotated[
        str, typer.Option(help="/classify, /tags, /search or /embed")
    ] = "/classify",
    json_path: JsonOpt = None,
) -> None:
    """Send N real requests built from held-out test images to the running service.

    The images are transformed by --shift; the service logs a sample of the requests for
    `vitrine drift`.
    """
    from monitoring.shifts import SHIFTS, build_requests
    from monitoring.simulate import ServiceUnavailable, send_requests

    if shift not in SHIFTS:
        fail(f"unknown shift {shift!r}: choose from {', '.join(SHIFTS)}", 2)
    params = load_params()
    url = url or f"http://{params.serving.host}:{params.serving.port}"
    try:
        payloads = build_requests(shift, n, params.data.catalogue_path(), seed=seed)
        result = send_requests(url, payloads, endpoint=endpoint, concurrency=concurrency)
    except (ServiceUnavailable, ValueError, OSError) as exc:
        fail(str(exc), 2)
    say(
        f"sent {result['sent']} {shift!r} requests to {url}{endpoint} in "
        f"{result['seconds']} s: {result['ok']} ok, {result['errors']} errors "
        f"(model versions {result['model_versions']})"
    )
    emit({"shift": shift, **result}, json_path)
    if result["errors"]:
        raise typer.Exit(1)


STATE_STYLES = {"active": "green", "paused": "yellow", "missing": "red"}


@app.command()
def deploy(
    list_only: Annotated[
        bool, typer.Option("--list", help="Only show the deployments and their next runs.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create or update the Prefect deployments on the local server (`vitrine ui` starts it).

    Retrain nightly, monitor hourly (drift triggers a retrain), promote every 10 minutes,
    refresh the champion's index hourly; crons from params.yaml `schedules`. `vitrine worker`
    executes their runs. Also the dead-host automation: a run silent for
    schedules.dead_host_seconds (no heartbeat: its host died) is marked Crashed.
    """
    from flows.dead_hosts import read_automation
    from flows.deployments import apply_deployments
    from flows.deployments import list_deployments as read_deployments
    from flows.server import PrefectUnavailable, api_url, prefect_api

    params = load_params()
    try:
        with prefect_api(api_url(params)):
            if not list_only:
                names = apply_deployments(params)
                if not as_json:
                    say(f"deployed {', '.join(names)} on {api_url(params)}")
            rows = read_deployments()
            dead_host = read_automation()
    except PrefectUnavailable as exc:
        fail(str(exc))
    except ValueError as exc:  # a cron or time zone Prefect refuses: nothing half-applied
        fail(f"params.yaml schedules: {exc}", 2)
    if as_json:
        payload = {"api_url": api_url(params), "deployments": rows, "dead_host": dead_host}
        return emit(payload, None, as_json=True)
    table = make_table("deployment", "cron", "timezone", "state", "next runs")
    for row in rows:
        if not row["exists"]:
            table.add_row(
                row["name"],
                "-",
                "-",
                Text("missing", STATE_STYLES["missing"]),
                "run `vitrine deploy`",
            )
            continue
        for sched in row["schedules"] or [{"cron": "-", "timezone": "-", "active": False}]:
            state = "paused" if row["paused"] or not sched["active"] else "active"
            when = ", ".join(t[:16].replace("T", " ") for t in row["next_runs"]) or "-"
            table.add_row(
                row["name"],
                sched["cron"] or "-",
                sched["timezone"] or "-",
                Text(state, STATE_STYLES[state]),
                when,
            )
    console.print(table)
    pool = params.schedules.work_pool
    say(f"runs execute when a worker polls work pool {pool!r}: `vitrine worker`")
    say(describe_dead_host(dead_host))


def describe_dead_host(automation: dict) -> str:
    name = automation["name"]
    if not automation["exists"]:
        return f"dead hosts: no automation {name!r} yet: `vitrine deploy` creates it"
    off = "" if automation["enabled"] else " (disabled in the Prefect UI)"
    return (
        f"dead hosts: a run silent for {automation['dead_host_seconds']} s (no heartbeat: its "
        f"host died) is marked Crashed by automation {name!r}{off}"
    )


@app.command()
def worker(
    grace: Annotated[
        float,
        typer.Option(help="On SIGTERM/Ctrl-C, seconds a running flow run may take to finish."),
    ] = 30.0,
    name: Annotated[
        str | None,
        typer.Option(
            help="The worker's name in Prefect (each run's log says which worker took it). "
            "Default: vitrine@<this host's name>; two workers on one host need two names."
        ),
    ] = None,
) -> None:
    """Execute the deployments' runs: a Prefect process worker on `schedules.work_pool`.

    Foreground until SIGTERM or Ctrl-C. The worker then stops polling at once: it claims no
    run after the signal, so a run waiting for the retrain slot stays for another worker. A
    running run gets --grace seconds to finish, after which it is stopped (Prefect marks it
    Crashed; a run stopped before registration leaves the registry as it was). Exit 0 after a
    stop by signal, 1 when the worker gave up (the Prefect server failed it repeatedly).
    Workers on several hosts may poll the same pool: each runs in its own state folder and
    params (VITRINE_HOME, VITRINE_PARAMS) and shares the registry through
    `registry.tracking_uri`; a host that dies without a SIGTERM is caught by `vitrine
    deploy`'s dead-host automation (docs/scale.md).
    """
    from flows.server import PrefectUnavailable, api_url, prefect_api

    params = load_params()
    name = name or f"vitrine@{socket.gethostname()}"
    url = api_url(params)
    os.environ["PREFECT_API_URL"] = url  # inherited by every run this process starts
    try:
        with prefect_api(url):
            from vitrine.worker import run_worker

            failure = run_worker(params.schedules.work_pool, name, grace, say=say)
    except PrefectUnavailable as exc:
        fail(str(exc))
    if failure:
        fail(f"worker {name!r} gave up: {failure}")


@stage_app.command("validate")
def stage_validate() -> None:
    """Validate data/catalogue into work/validate."""
    from components.stages import validate

    emit(validate.run(_context()), None, as_json=True)


@stage_app.command("labels")
def stage_labels() -> None:
    """Clean labels into work/labels."""
    from components.stages import labels

    emit(labels.run(_context()), None, as_json=True)


@stage_app.command("train")
def stage_train() -> None:
    """Train into work/train."""
    from components.stages import train

    summary = train.run(_context())
    emit({k: v for k, v in summary.items() if k != "history"}, None, as_json=True)


@stage_app.command("detect")
def stage_detect() -> None:
    """Train the product detector into work/detect."""
    from components.stages import detect

    emit(detect.run(_context()), None, as_json=True)


@stage_app.command("evaluate")
def stage_evaluate() -> None:
    """Evaluate into work/evaluate."""
    from components.stages import evaluate

    emit(evaluate.run(_context()), None, as_json=True)


@stage_app.command("register")
def stage_register() -> None:
    """Register work/ as a challenger, then gate it."""
    from components.release.registry import open_registry
    from components.stages import gate, register

    ctx = _context()
    registry = open_registry(ctx.paths, ctx.params)
    registered = register.run(ctx, registry, cause="dvc-repro")
    emit({**registered, "gate": gate.run(ctx, registry)}, None, as_json=True)


if __name__ == "__main__":
    app()
