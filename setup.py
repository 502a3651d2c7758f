"""Everything is in pyproject.toml but one file: `_depthwave_lm_eval.pth`, which must land in site-packages itself
(not in a package) so that `lm_eval --model depthwave` works after install (see src/_depthwave_lm_eval.py).
setuptools has no setting for that, so the wheel build and the editable build each add it here."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "_depthwave_lm_eval.pth"
SOURCE = Path(__file__).resolve().parent / "src" / PTH


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(SOURCE), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheel(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):  # type: ignore[no-untyped-def]
        files, mapping = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        # What lies at the root of the unpacked wheel is installed into site-packages.
        self.copy_file(str(SOURCE), str(Path(unpacked_wheel) / PTH))
        return files, mapping


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
