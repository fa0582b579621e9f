"""The CLI's one error path: a CorralError becomes one `corral: error:` line with the command's
exit status, and a library error about a config field is shown with the flag the user typed.
Every case here fails before a VM is built, so no KVM is needed."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from corral.cli import Command, Failure, Group, describe, main
from corral.errors import ConfigError, CorralError, FieldError


def fails(*args: str, code: int = 2) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: error: "), res.output
    return lines[0].removeprefix("corral: error: ")


@pytest.fixture
def kernel(tmp_path):
    """A --kernel path: config errors come before the kernel file is read."""
    return str(tmp_path / "vmlinux")


def test_a_bad_field_is_shown_with_its_flag(kernel):
    line = fails("run", "--kernel", kernel, "--cpus", "0")
    assert line == "--cpus: cpus must be between 1 and 254, got 0"
    assert fails("run", "--kernel", kernel, "--memory", "0") == "--memory: 0B is too small: give at least 16M"
    line = fails("run", "--kernel", kernel, "--cpu-hide", "warp")
    assert line.startswith("--cpu-hide: unknown CPU feature warp: choose from ")


def test_every_bad_field_is_shown(kernel):
    line = fails("run", "--kernel", kernel, "--cpus", "0", "--memory", "lots")
    assert line == (
        "--cpus: cpus must be between 1 and 254, got 0; "
        "--memory: 'lots' is not a size: write it like 512M, 2G or 4096K"
    )


def test_option_syntax_errors_name_the_flag_and_show_the_syntax(kernel):
    line = fails("run", "--kernel", kernel, "--disk", "a.img,ro", "--disk", "b.img,colour=red")
    assert (
        line
        == "--disk: 'b.img,colour=red' has an unknown key 'colour': use PATH[,ro][,serial=ID][,overlay=FILE]"
    )
    line = fails("run", "--kernel", kernel, "--net", "user")
    assert line.startswith("--net: 'user' is not a tap: only tap networking exists: use tap[=NAME]")
    assert fails("run", "--kernel", kernel, "--vsock", "uds=/tmp/v").endswith("needs cid: use cid=N,uds=PATH")
    line = fails("run", "--kernel", kernel, "--virtio-console", "tty")
    assert line == "--virtio-console: 'tty' has an unknown key 'tty': use pty|file=PATH"


def test_a_field_inside_an_option_shows_the_value_typed(kernel):
    serial = "s" * 21
    line = fails("run", "--kernel", kernel, "--disk", "a.img", "--disk", f"b.img,serial={serial}")
    assert line == f"--disk b.img,serial={serial}: serial: String should have at most 20 characters"
    line = fails("run", "--kernel", kernel, "--vsock", "cid=2,uds=/tmp/v")
    assert line == "--vsock cid=2,uds=/tmp/v: cid: Input should be greater than or equal to 3"


def test_cli_own_errors(kernel):
    assert fails("run", "--kernel", kernel, "--image", "probe") == "give either --kernel or --image, not both"
    assert fails("run", "--image", "windows95").startswith("no image named 'windows95': choose one of")


def test_control_verbs_without_a_vm(tmp_path):
    sock = tmp_path / "vm.sock"
    for verb in (
        ["pause"],
        ["resume"],
        ["stop"],
        ["status"],
        ["snapshot", str(tmp_path / "s")],
        ["balloon"],
        ["migrate", "--insecure", "127.0.0.1:1"],
    ):
        line = fails(verb[0], "--api", str(sock), *verb[1:], code=1)
        assert line == f"no control socket at {sock}: start the VM with --api {sock}"
    # a bad SIZE is the user's typing (exit 2), found before the socket is tried
    assert (
        fails("balloon", "--api", str(sock), "lots")
        == "'lots' is not a size: write it like 512M, 2G or 4096K"
    )


def test_receive_fails_with_status_1():
    assert "HOST:PORT" in fails("receive", "--listen", "nowhere", code=1)


def _ctx_for(**params) -> click.Context:
    @click.command(cls=Command)
    @click.option("--disk", "disks", multiple=True)
    @click.option("-n", "--count", "count")
    def cmd(**_):
        pass

    ctx = click.Context(cmd)
    ctx.params.update(params)
    return ctx


def test_describe_maps_fields_to_flags():
    ctx = _ctx_for(disks=("a.img", "b.img,serial=x"), count="3")
    assert describe(FieldError("count", "too many"), ctx) == "--count: too many"
    assert describe(FieldError("disks[1].serial", "bad"), ctx) == "--disk b.img,serial=x: serial: bad"
    assert describe(FieldError("disks[7].serial", "bad"), ctx) == "--disk: serial: bad"
    # a field the command has no flag for keeps its path; other errors keep their message
    assert (
        describe(FieldError("colour", "Extra inputs are not permitted"), ctx)
        == "colour: Extra inputs are not permitted"
    )
    assert describe(ConfigError("plain"), ctx) == "plain"


def test_error_code_is_per_command_and_per_phase():
    group = Group("g")

    @group.command(error_code=1)
    def early():
        raise CorralError("early failure")

    @group.command(error_code=1)
    @click.pass_context
    def late(ctx):
        ctx.meta["corral.error_code"] = 2
        raise CorralError("late failure")

    runner = CliRunner()
    res = runner.invoke(group, ["early"])
    assert (res.exit_code, res.output) == (1, "corral: error: early failure\n")
    res = runner.invoke(group, ["late"])
    assert (res.exit_code, res.output) == (2, "corral: error: late failure\n")
    assert isinstance(Failure("x"), click.ClickException) and Failure("x").exit_code == 2


def test_kvm_and_api_options_are_declared_once():
    by_command = {name: {p.name: p for p in cmd.params} for name, cmd in main.commands.items()}
    kvm = [params["kvm_path"] for params in by_command.values() if "kvm_path" in params]
    assert len(kvm) == 6  # run restore clone receive doctor firecracker
    assert all(p.envvar == "CORRAL_KVM" and p.default == "/dev/kvm" for p in kvm)
    serve = [by_command[c]["api_path"] for c in ("run", "restore", "receive")]
    assert len({p.help for p in serve}) == 1
    verbs = [params["vm"] for params in by_command.values() if "vm" in params]
    # pause resume wake stop status snapshot balloon migrate dump stats
    assert len(verbs) == 10 and all(p.required and p.opts == ["--api"] for p in verbs)
