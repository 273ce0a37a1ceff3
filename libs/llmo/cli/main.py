"""The `llmo` command: run the platform, one service, benchmarks and the demo."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from llmo.cli.config import config
from llmo.cli.tune import tune
from llmo.core.settings import SERVICES, CommandSettings, PlatformSettings

console = Console(stderr=True)
out = Console()


# Short names for service command groups: `llmo eval ...` is `llmo evaluation ...`.
ALIASES = {"eval": "evaluation"}


class LlmoGroup(click.Group):
    """Mounts each service's own commands (`llmo.<service>.cli:cli`) lazily as `llmo <service> ...`
    (and under its alias in ALIASES)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        own = super().list_commands(ctx)
        return own + [name for name in SERVICES if name not in own and _has_module(f"llmo.{name}.cli")]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in ALIASES:
            cmd_name = ALIASES[cmd_name]
        if command is not None or cmd_name not in SERVICES or not _has_module(f"llmo.{cmd_name}.cli"):
            return command
        module = importlib.import_module(f"llmo.{cmd_name}.cli")
        return getattr(module, "cli", None)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@click.group(cls=LlmoGroup)
@click.version_option(package_name="llmo")
def cli() -> None:
    """LLMO: one front door for an organisation's LLM traffic.

    \b
    Run the whole embedded stack:   llmo up
    Run one service (containers):   llmo serve cost
    Drive traffic through it all:   llmo demo
    Measure against peers:          llmo bench <area>
    """
    from llmo.core.logging import configure_logging

    # Logs go to stderr, so stdout carries only results (tables, --json, bench JSON).
    configure_logging("llmo", level=_command_settings().log_level)


@cli.command()
@click.argument("service", type=click.Choice(SERVICES))
def serve(service: str) -> None:
    """Run one service until SIGTERM (what each container runs)."""
    from llmo.core.logging import configure_logging

    platform = PlatformSettings()
    configure_logging(service, env=platform.env, level=platform.log_level)
    if not _has_module(f"llmo.{service}.main"):
        raise click.ClickException(f"the {service} service is not implemented in this release")
    module = importlib.import_module(f"llmo.{service}.main")
    try:
        asyncio.run(module.serve())
    except KeyboardInterrupt:
        pass


def _data_dir(value: str | None) -> Path:
    return Path(value) if value else PlatformSettings().data_dir


def _endpoint_table(state: Any, health: dict[str, str] | None = None) -> Table:
    table = Table(title="LLMO embedded stack")
    table.add_column("service")
    table.add_column("gRPC")
    table.add_column("HTTP")
    table.add_column("metrics")
    if health is not None:
        table.add_column("health")
    table.add_row("nats", state.nats_url, "", "", *([""] if health is not None else []))
    for name, endpoint in state.services.items():
        row = [name, endpoint.grpc, endpoint.http, endpoint.metrics]
        if health is not None:
            status = health.get(name, "?")
            row.append(f"[green]{status}[/]" if status == "SERVING" else f"[red]{status}[/]")
        table.add_row(*row)
    return table


@cli.command()
@click.option("--data-dir", envvar="LLMO_DATA_DIR", help="Where state lives (default .llmo).")
@click.option("--service", "services", multiple=True, type=click.Choice(SERVICES), help="Only these services (repeatable).")
@click.option("--random-ports", is_flag=True, help="Pick free ports instead of the conventional ones.")
def up(data_dir: str | None, services: tuple[str, ...], random_ports: bool) -> None:
    """Start nats-server and every implemented service; stop all on Ctrl-C / SIGTERM."""
    from llmo.cli.stack import Stack, implemented_services
    from llmo.core.logging import configure_logging
    from llmo.core.server import wait_for_shutdown_signal

    configure_logging("llmo", level="warning")
    chosen = list(services) or implemented_services()
    if not chosen:
        raise click.ClickException("no service is implemented yet")

    async def run() -> None:
        stack = Stack(_data_dir(data_dir), services=chosen, random_ports=random_ports)
        with console.status(f"starting nats-server and {', '.join(chosen)}..."):
            try:
                state = await stack.start()
            except (RuntimeError, TimeoutError, ValueError) as error:
                raise click.ClickException(str(error)) from error
        out.print(_endpoint_table(state))
        out.print(f"logs: {stack.data_dir / 'logs'}   stop with Ctrl-C")
        await wait_for_shutdown_signal()
        with console.status("draining and stopping..."):
            codes = await stack.stop()
        out.print("stopped: " + ", ".join(f"{name} (exit {code})" for name, code in codes.items()))

    asyncio.run(run())


@cli.command()
@click.option("--data-dir", envvar="LLMO_DATA_DIR", help="Data directory of the running stack.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(data_dir: str | None, as_json: bool) -> None:
    """Show the running embedded stack and each service's health."""
    from llmo.cli.stack import StackState, check_health

    state = StackState.load(_data_dir(data_dir))
    if state is None:
        raise click.ClickException(f"no stack running in {_data_dir(data_dir)} (start one with `llmo up`)")

    async def probe() -> dict[str, str]:
        names = list(state.services)
        results = await asyncio.gather(*(check_health(state.services[n].grpc) for n in names))
        return dict(zip(names, results, strict=True))

    health = asyncio.run(probe())
    if as_json:
        click.echo(json.dumps({"nats": state.nats_url, "services": {
            n: {"grpc": e.grpc, "http": e.http, "metrics": e.metrics, "health": health[n], "pid": e.pid}
            for n, e in state.services.items()}}))
    else:
        out.print(_endpoint_table(state, health))
    if any(h != "SERVING" for h in health.values()):
        sys.exit(1)


def _command_settings() -> CommandSettings:
    try:
        return CommandSettings()
    except ValidationError as error:
        raise click.ClickException(f"bad environment: {error}") from error


def _benchmarks_dir() -> Path:
    configured = _command_settings().benchmarks_dir
    if configured:
        return Path(configured)
    import llmo

    return Path(llmo.__file__).resolve().parents[2] / "tests" / "benchmarks"


def _bench_areas() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in _benchmarks_dir().glob("bench_*.py"))


# No click --help here: after an area, --help belongs to the benchmark (its argparse prints its options).
@cli.command(add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("area", required=False)
@click.option("--list", "list_areas", is_flag=True, help="List the benchmark areas.")
@click.pass_context
def bench(ctx: click.Context, area: str | None, list_areas: bool) -> None:
    """Run `tests/benchmarks/bench_<AREA>.py` and print one JSON object.

    Extra arguments go to the benchmark; `llmo bench <AREA> --help` shows its options.
    """
    if area in ("--help", "-h") or (not area and {"--help", "-h"} & set(ctx.args)):
        click.echo(ctx.get_help())
        return
    areas = _bench_areas()
    if list_areas or not area:
        click.echo(" ".join(areas))
        return
    if area not in areas:
        raise click.ClickException(f"unknown benchmark area {area!r}; available: {', '.join(areas) or 'none'}")
    path = _benchmarks_dir() / f"bench_{area}.py"
    spec = importlib.util.spec_from_file_location(f"llmo_bench_{area}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(list(ctx.args))
    click.echo(json.dumps(result, indent=2, sort_keys=False, default=str))


@cli.command()
@click.option("--data-dir", help="Where the demo keeps its state (default: a fresh temp dir).")
@click.option("--service", "services", multiple=True, type=click.Choice(SERVICES), help="Only these services.")
def demo(data_dir: str | None, services: tuple[str, ...]) -> None:
    """Start the embedded stack with API keys on, drive real traffic through every implemented
    service as its users would (the router's OpenAI API, then the ledger over gRPC), stop."""
    import tempfile

    from llmo.cli.stack import Stack, implemented_services
    from llmo.core.logging import configure_logging

    configure_logging("llmo", level="warning")
    chosen = list(services) or implemented_services()
    if not chosen:
        raise click.ClickException("no service is implemented yet")
    tenants, admin_key = _demo_keys()

    async def run(directory: Path) -> bool:
        stack = Stack(directory, services=chosen, random_ports=True, env=_demo_env(tenants, admin_key))
        with console.status(f"starting nats-server and {', '.join(chosen)}..."):
            try:
                state = await stack.start()
            except (RuntimeError, TimeoutError, ValueError) as error:
                raise click.ClickException(str(error)) from error
        out.print(_endpoint_table(state))
        out.print(f"API keys (minted for this run): {', '.join(tenants)}, {DEMO_ADMIN_TENANT} (admin), the router's and retrieval's service keys")
        ran: list[str] = []
        failed: list[str] = []
        try:
            for name in _demo_order(chosen):
                if not _has_module(f"llmo.{name}.demo"):
                    continue
                out.rule(f"[bold]{name}")
                module = importlib.import_module(f"llmo.{name}.demo")
                try:
                    for line in await module.run_demo(state.endpoints(), tenants=tenants, admin_key=admin_key):
                        out.print(f"  {line}" if isinstance(line, str) else line)
                    ran.append(name)
                except Exception as error:
                    failed.append(name)
                    out.print(f"  [red]demo failed: {error}[/]  (log: {state.services[name].log_file})")
        finally:
            with console.status("stopping..."):
                codes = await stack.stop()
        bad = {n: c for n, c in codes.items() if c != 0}
        out.rule()
        if bad:
            out.print(f"[red]services exited uncleanly: {bad}[/]")
        if failed or bad:
            out.print(f"[red]demo failed[/] ({', '.join(failed) or 'unclean exit'})")
            return False
        out.print(f"[bold green]demo OK[/]: {', '.join(ran)} passed; every service stopped cleanly")
        return True

    if data_dir:
        ok = asyncio.run(run(Path(data_dir)))
    else:
        with tempfile.TemporaryDirectory(prefix="llmo-demo-") as tmp:
            ok = asyncio.run(run(Path(tmp)))
    sys.exit(0 if ok else 1)


DEMO_TENANTS = ("tenantA", "tenantB")
DEMO_ADMIN_TENANT = "finops"


def _demo_keys() -> tuple[dict[str, str], str]:
    """(end tenant -> API key, an admin tenant's key), fresh for each run."""
    import secrets

    tenants = {tenant: f"llmo-demo-{secrets.token_urlsafe(16)}" for tenant in DEMO_TENANTS}
    return tenants, f"llmo-demo-{secrets.token_urlsafe(16)}"


def _demo_env(tenants: dict[str, str], admin_key: str) -> dict[str, str]:
    """The stack's API keys; the stack adds the services' own keys (llmo.cli.stack.service_keys)."""
    keys = {key: tenant for tenant, key in tenants.items()} | {admin_key: DEMO_ADMIN_TENANT}
    # The visibility step crawls a site it serves on 127.0.0.1, which the crawler refuses by default;
    # the site is its own, so it need not wait a second between pages.
    return {"LLMO_API_KEYS": json.dumps(keys), "LLMO_ADMIN_TENANTS": DEMO_ADMIN_TENANT,
            "LLMO_VISIBILITY_FETCH_ALLOW": "127.0.0.1", "LLMO_VISIBILITY_MIN_DELAY_S": "0.1"}


def _demo_order(services: list[str]) -> list[str]:
    # The router first: its step checks the ledger holds exactly its requests. The cost
    # step last, so it reports what the others sent.
    order = ["router", "inference", "retrieval", "evaluation", "visibility", "cost"]
    return [s for s in order if s in services]


cli.add_command(config)
cli.add_command(tune)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
