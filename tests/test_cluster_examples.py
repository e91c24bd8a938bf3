"""The cluster launch examples (examples/distributed/) and docs/distributed.md: the shell scripts parse,
the sbatch header is one Slurm reads, the manifest has what the Kubeflow training operator needs, and every
`plainlm finetune|pretrain` and `torchrun` command line in them uses only options that exist."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from torch.distributed.run import get_args_parser

from plainlm.recipe import known_keys, parser_for

EXAMPLES = REPO / "examples" / "distributed"
SCRIPTS = [EXAMPLES / "torchrun_multinode.sh", EXAMPLES / "slurm.sbatch"]
DOCUMENTS = [REPO / "docs" / "distributed.md", EXAMPLES / "README.md", *SCRIPTS, EXAMPLES / "kubernetes.yaml"]
RECIPES = {
    "finetune": "recipes/finetune/smollm2-135m-instruct/full.yaml",
    "pretrain": "recipes/pretrain/tiny-stories.yaml",
}
# Values for the shell variables the command lines use; a new variable must be added here.
SAMPLE_VALUES = {
    "RECIPE": RECIPES["finetune"],
    "OUT_DIR": "out/cluster-example",
    "HEAD": "node-a",
    "HEAD_NODE": "node-a",
    "JOB": "job-1",
    "JOB_ID": "job-1",
    "RDZV_PORT": "29500",
    "NNODES": "2",
    "GPUS_PER_NODE": "8",
    "SLURM_NNODES": "2",
    "SLURM_JOB_ID": "1234",
    "MASTER_ADDR": "plainlm-finetune-master-0",
    "MASTER_PORT": "23456",
    "GLOBAL_BATCH_SIZE": "64",
    "MICRO_BATCH_SIZE": "4",
}
PLAINLM_COMMAND = re.compile(r"\bplainlm (finetune|pretrain)\b")
SHELL_END = re.compile(r"\s(#|&&|\|\||;|\|)(\s|$)")  # a comment or the next command ends a command line


def substitute(text: str, values: dict[str, str], where: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        assert name in values, f"{where}: ${name} has no sample value; add one to SAMPLE_VALUES"
        return values[name]

    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", value, text)


def command_lines(text: str, markdown: bool) -> list[str]:
    """The shell command lines of a text (backslash continuations joined); of markdown, those in its code."""
    text = re.sub(r"\\\n\s*", " ", text)
    if not markdown:
        return [SHELL_END.split(line, maxsplit=1)[0] for line in text.splitlines() if not line.lstrip().startswith("#")]
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(SHELL_END.split(line, maxsplit=1)[0])
        else:
            lines.extend(re.findall(r"`([^`]+)`", line))
    return lines


def plainlm_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(finetune|pretrain, its arguments) for every plainlm command line in `path`."""
    found = []
    for line in command_lines(path.read_text(), markdown=path.suffix == ".md"):
        match = PLAINLM_COMMAND.search(line)
        if match:
            found.append((match.group(1), shlex.split(line[match.end() :])))
    return found


def torchrun_commands(text: str, values: dict[str, str], where: str, markdown: bool = False) -> list:
    """torchrun's parsed arguments for every `torchrun ... -m plainlm ...` line of a shell script or markdown."""
    parsed = []
    for line in command_lines(text, markdown):
        match = re.search(r"\btorchrun\s", line)
        if match and "-m plainlm" in line:
            args = shlex.split(substitute(line[match.end() :], values, where))
            parsed.append(get_args_parser().parse_args(args))
    return parsed


def plainlm_config(name: str, args: list[str], values: dict[str, str], where: str):
    """`args` of `plainlm finetune|pretrain`, shell variables filled in, parsed as the command parses them."""
    import plainlm.finetune
    import plainlm.pretrain

    function = {"finetune": plainlm.finetune.finetune, "pretrain": plainlm.pretrain.pretrain}[name]
    parser = parser_for(function, f"plainlm {name}")
    valid = known_keys(parser) | {"config"}
    for arg in args:
        if arg.startswith("--"):
            option = arg[2:].split("=", 1)[0]
            assert option in valid, f"{where}: plainlm {name} has no option --{option}: {shlex.join(args)}"
    args = shlex.split(substitute(shlex.join(args), values, where))
    if "--config" not in args:  # the required keys (checkpoint_dir, tokenizer_dir) come from a recipe
        args = ["--config", RECIPES[name], *args]
    return parser.parse_args(args)


def assert_batch_fits(cfg, world_size: int, where: str) -> None:
    global_batch, micro_batch = cfg.train.global_batch_size, cfg.train.micro_batch_size
    assert global_batch % (micro_batch * world_size) == 0, (
        f"{where}: global_batch_size {global_batch} is not a multiple of micro_batch_size {micro_batch} "
        f"x world size {world_size}"
    )


def assert_runs_plainlm(torchrun, values: dict[str, str], where: str) -> None:
    """torchrun starts `-m plainlm`, with a c10d rendezvous, options that exist and a batch that splits."""
    assert torchrun.module and torchrun.training_script == "plainlm", where
    assert torchrun.rdzv_backend == "c10d" and torchrun.rdzv_endpoint and torchrun.rdzv_id, where
    name, *args = torchrun.training_script_args
    cfg = plainlm_config(name, args, values, where)
    assert_batch_fits(cfg, int(torchrun.nnodes) * int(torchrun.nproc_per_node), where)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in script.read_text()


def test_sbatch_directives_come_before_the_first_command() -> None:
    lines = (EXAMPLES / "slurm.sbatch").read_text().splitlines()
    assert lines[0].startswith("#!")
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command, "sbatch ignores #SBATCH lines after the first command"
    options = dict(re.fullmatch(r"#SBATCH --([\w-]+)(?:=(\S+))?(?:\s+#.*)?", lines[i]).groups() for i in directives)
    for required in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time"):
        assert required in options, f"#SBATCH --{required} is missing"
    assert options["ntasks-per-node"] == "1"  # torchrun starts the per-GPU processes
    gpus_per_node = re.search(r"^GPUS_PER_NODE=(\d+)$", "\n".join(lines), re.MULTILINE).group(1)
    assert gpus_per_node == options["gpus-per-node"]

    values = {**SAMPLE_VALUES, "GPUS_PER_NODE": gpus_per_node, "SLURM_NNODES": options["nodes"]}
    (torchrun,) = torchrun_commands("\n".join(lines), values, "slurm.sbatch")
    assert "srun" in "\n".join(lines[first_command:]) and "scontrol show hostnames" in "\n".join(lines)
    assert torchrun.nproc_per_node == gpus_per_node
    assert_runs_plainlm(torchrun, values, "slurm.sbatch")


def test_torchrun_script_runs_plainlm_as_a_module() -> None:
    script = (EXAMPLES / "torchrun_multinode.sh").read_text()
    (torchrun,) = torchrun_commands(script, SAMPLE_VALUES, "torchrun_multinode.sh")
    assert torchrun.rdzv_endpoint == "node-a:29500"
    assert_runs_plainlm(torchrun, SAMPLE_VALUES, "torchrun_multinode.sh")


def test_kubernetes_manifest_has_what_the_operator_needs() -> None:
    documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes.yaml").read_text()))
    (job,) = [d for d in documents if d["kind"] == "PyTorchJob"]
    claims = {d["metadata"]["name"]: d for d in documents if d["kind"] == "PersistentVolumeClaim"}
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    nodes = sum(spec["replicas"] for spec in replicas.values())
    for role, spec in replicas.items():
        assert spec["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode"), role
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        assert container["name"] == "pytorch", f"{role}: the training operator requires the container name pytorch"
        assert container["image"] and (container.get("command") or container.get("args")), role
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert isinstance(gpus, int) and gpus > 0, role
        if role == "Master":  # MASTER_PORT is read from this port
            assert "pytorchjob-port" in {p["name"] for p in container["ports"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, f"{role}: volumeMount {mount['name']} has no volume"
        shared = [v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v]
        assert shared and all("ReadWriteMany" in claims[name]["spec"]["accessModes"] for name in shared)

        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        script = "\n".join([*container.get("command", []), *container.get("args", [])])
        (torchrun,) = torchrun_commands(script, {**SAMPLE_VALUES, **env}, f"kubernetes.yaml {role}")
        assert_runs_plainlm(torchrun, {**SAMPLE_VALUES, **env}, f"kubernetes.yaml {role}")
        assert torchrun.nproc_per_node == str(gpus), f"{role}: --nproc_per_node is not the pod's GPU count"
        assert torchrun.nnodes == str(nodes), f"{role}: --nnodes is not Master + Worker replicas"
        assert torchrun.rdzv_endpoint == "plainlm-finetune-master-0:23456"


def test_torchrun_lines_in_the_docs_parse() -> None:
    document = REPO / "docs" / "distributed.md"
    commands = torchrun_commands(document.read_text(), SAMPLE_VALUES, document.name, markdown=True)
    assert len(commands) >= 2  # the multi-node command and the Slurm excerpt
    for torchrun in commands:
        assert_runs_plainlm(torchrun, SAMPLE_VALUES, document.name)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_plainlm_command_uses_existing_options(document: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command is parsed by the parser `plainlm finetune|pretrain` itself uses (recipe.parser_for), and its
    global batch splits over the processes it asks for (under torchrun: one, torchrun's flags are checked above)."""
    monkeypatch.chdir(REPO)  # recipe paths are relative to the checkout
    commands = plainlm_commands(document)
    assert commands, f"{document}: no plainlm command line found"
    for name, args in commands:
        cfg = plainlm_config(name, args, SAMPLE_VALUES, document.name)
        world_size = (getattr(cfg, "devices", None) or 1) * (getattr(cfg, "num_nodes", None) or 1)
        assert_batch_fits(cfg, world_size, f"{document.name}: plainlm {name} {shlex.join(args)}")
