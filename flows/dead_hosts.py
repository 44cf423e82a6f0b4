"""Dead-host detection: the automation `vitrine deploy` keeps on the Prefect server.

A stopped worker stops its runs itself (`vitrine worker`). A host that dies without a SIGTERM
(power loss; its worker and flow-run processes killed) cannot: its run stays Running forever
and, a retrain, keeps the deployment's slot. So every run of the deployments sends a heartbeat
event every `schedules.heartbeat_seconds` (the deployments carry the setting, see
flows/deployments.py), and this automation expects, after a run's Running state or a heartbeat,
another heartbeat or a terminal state within `schedules.dead_host_seconds`. When none comes the
server sets the run Crashed, which frees the slot. Prefect's recipe, narrowed to the vitrine
deployments' runs: https://docs.prefect.io/v3/advanced/detect-zombie-flows
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from components.config import SchedulesParams

AUTOMATION = "vitrine: crash runs of a dead host"
HEARTBEAT_SETTING = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"  # read by each run's flow engine
RUN = "prefect.flow-run"
ENDS = ("Completed", "Failed", "Cancelled", "Crashed")


def crash_message(seconds: int) -> str:
    return f"no heartbeat for {seconds} s: its host died or lost the network ({AUTOMATION!r})"


def build_automation(schedules: SchedulesParams, deployment_ids: list[UUID]) -> AutomationCore:
    """The automation for the runs of the deployments `deployment_ids`."""
    seconds = schedules.dead_host_seconds
    return AutomationCore(
        name=AUTOMATION,
        description=(
            f"A run of the vitrine deployments beats every {schedules.heartbeat_seconds} s; "
            f"{seconds} s without a heartbeat or an end marks it Crashed (params.yaml "
            "schedules.dead_host_seconds; set by `vitrine deploy`)."
        ),
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": f"{RUN}.*"}),
            match_related=ResourceSpecification(
                {
                    "prefect.resource.role": "deployment",
                    "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids],
                }
            ),
            after={f"{RUN}.Running", f"{RUN}.heartbeat"},
            expect={f"{RUN}.heartbeat", *(f"{RUN}.{end}" for end in ENDS)},
            for_each={"prefect.resource.id"},  # one window per run
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=crash_message(seconds))],
    )


def apply_automation(schedules: SchedulesParams, deployment_ids: list[UUID]) -> None:
    """Create the automation, or update the one of that name (idempotent: one, never two)."""
    automation = build_automation(schedules, deployment_ids)
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(AUTOMATION)
        if not found:
            client.create_automation(automation)
            return
        client.update_automation(found[0].id, automation)
        for duplicate in found[1:]:  # two `vitrine deploy`s racing on a new server
            client.delete_automation(duplicate.id)


def read_automation() -> dict:
    """The automation as `vitrine deploy --list` shows it."""
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(AUTOMATION)
    if not found:
        return {"name": AUTOMATION, "exists": False}
    trigger = found[0].trigger
    return {
        "name": AUTOMATION,
        "exists": True,
        "enabled": found[0].enabled,
        "dead_host_seconds": int(trigger.within.total_seconds()),
        "description": found[0].description,
    }
