"""tools/gpu_environment.py: what the package and the GPU command import is on the GPU machine
(its image's packages or the carried wheels), and the checker can tell when it is not."""

import subprocess
import sys
import textwrap

from tools import gpu_check, gpu_environment
from tools.gpu_environment import REPO


def test_every_import_of_the_package_and_the_gpu_command_is_on_the_gpu_machine():
    imports = gpu_environment.third_party_imports(gpu_environment.gpu_command_files())
    assert {"torch", "PIL", "omegaconf", "fvcore", "pytest"} <= set(imports)
    assert gpu_environment.import_problems(imports) == []
    assert gpu_environment.carried_requirement_problems() == []


def test_the_gpu_command_files_are_what_it_runs_and_what_they_import():
    files = {path.relative_to(REPO).as_posix() for path in gpu_environment.gpu_command_files()}
    assert {
        "tools/gpu_check.py",
        "tools/train_net.py",
        "datasets/prepare_synthetic.py",
        "tests/conftest.py",
        "tests/test_gpu.py",
        "tests/test_model.py",  # imported by tests/test_gpu.py
        "tools/benchmark_loss.py",  # imported by tests/test_benchmark.py
        "eomt/modeling/eomt.py",
    } <= files
    assert "tools/sweep.py" not in files and "tests/test_onnx.py" not in files


def test_a_module_the_gpu_machine_lacks_is_reported_where_it_is_imported(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """\
            import numpy
            from PIL import Image
            import not_a_package_anywhere.sub


            class Reader:
                import pyspng


            def log():
                import wandb
                from cityscapesscripts.helpers.labels import labels
            """
        )
    )
    imports = gpu_environment.third_party_imports([script])
    assert set(imports) == {
        "numpy",
        "PIL",
        "not_a_package_anywhere",
        "pyspng",
        "wandb",
        "cityscapesscripts",
    }
    assert [site.module_level for site in imports["pyspng"]] == [True]  # a class body runs
    assert [site.module_level for site in imports["wandb"]] == [False]
    problems = gpu_environment.import_problems(imports)
    assert len(problems) == 2
    assert problems[0].startswith(
        f"not_a_package_anywhere (not_a_package_anywhere), imported at {script}:3"
    )
    # Listed as not needed there, but imported when its file is loaded: the package would
    # not import on the GPU machine.
    assert problems[1].startswith("pyspng is not on the GPU machine")
    assert f"{script}:7" in problems[1]


def test_imports_map_to_their_distributions():
    assert gpu_environment.normalize(gpu_environment.distributions_of("PIL")[0]) == "pillow"
    assert gpu_environment.normalize(gpu_environment.distributions_of("yaml")[0]) == "pyyaml"
    assert gpu_environment.distributions_of("not_installed_here") == ["not_installed_here"]
    # torch.utils.tensorboard needs the tensorboard distribution besides torch.
    assert gpu_environment.NEEDS_ANOTHER_DISTRIBUTION["torch.utils.tensorboard"] == "tensorboard"


def test_a_carried_wheel_needs_what_it_requires(monkeypatch):
    without_iopath = [r for r in gpu_check.GPU_WHEELS if not r.startswith("iopath")]
    monkeypatch.setattr(gpu_check, "GPU_WHEELS", without_iopath)
    (problem,) = gpu_environment.carried_requirement_problems()
    assert problem.startswith("fvcore==") and "['iopath']" in problem


def test_the_stand_in_installs_image_packages_only_and_checks_what_it_got():
    requirements = gpu_environment.standin_requirements()
    assert {"torch==2.11.0", "torchvision==0.26.0", "triton==3.6.0", "numpy==2.5.2"} <= set(
        requirements
    )
    assert "pillow" in requirements and "pytest" in requirements
    names = {gpu_environment.requirement_name(r) for r in requirements}
    assert names <= {gpu_environment.normalize(n) for n in gpu_check.GPU_IMAGE_PACKAGES}
    assert "timm" not in names  # carried: its wheel shadows the image's
    installed = ["numpy", "torch", "omegaconf", "Pillow", "cityscapesScripts", "filelock", "eomt"]
    assert gpu_environment.unexpected_distributions(installed) == ["cityscapesscripts"]


def test_the_package_imports_without_the_modules_the_gpu_machine_lacks():
    # None in sys.modules makes an import of that name fail, as on the GPU machine.
    code = textwrap.dedent(
        """\
        import sys
        for name in ("cityscapesscripts", "pyspng", "wandb"):
            sys.modules[name] = None
        import eomt, eomt.data, eomt.data.layouts, eomt.deploy.predictor, eomt.tasks.evaluate
        from eomt.evaluation import panoptic_io
        assert panoptic_io.libspng() is None
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_server_passes_only_as_a_file_not_needed_on_the_gpu(monkeypatch):
    """Without FILES_NOT_NEEDED_ON_GPU the server's FastAPI import is a problem: the check
    reads the server, and only that entry lets it pass."""
    monkeypatch.setattr(gpu_check, "FILES_NOT_NEEDED_ON_GPU", {})
    imports = gpu_environment.third_party_imports(gpu_environment.gpu_command_files())
    assert any(p.startswith("fastapi") for p in gpu_environment.import_problems(imports))
