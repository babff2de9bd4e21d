"""Build of the C extension glofnd._C (CPython + NumPy only; never torch).

Environment switches:
  GLOFND_NO_OPENMP=1   build without OpenMP (the kernels stay correct, single-threaded)
  GLOFND_DEBUG=1       -O0 -g, assertions on
  GLOFND_SANITIZE=...  comma list passed to -fsanitize= (e.g. address,undefined); implies debug
  GLOFND_WERROR=1      warnings are errors, and a failed build is an error (CI)
  GLOFND_NATIVE=1      -march=native, for local builds only (the wheel would not be portable)
  GLOFND_NO_EXTENSION=1  skip the extension: the package runs on its pure-torch reference
Without these, a failed compile leaves a working pure-Python install (optional extension).
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy
from setuptools import Extension, setup


def flag(name):
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


def compiler_accepts(args):
    """True when the C compiler builds and links a small OpenMP program with these flags."""
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        cmd = [cc, src, "-o", os.path.join(tmp, "t")] + args
        return subprocess.run(cmd, capture_output=True).returncode == 0


def extension():
    compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wshadow", "-Wconversion",
                    "-Wno-sign-conversion", "-ffp-contract=off", "-fno-math-errno",
                    "-fno-trapping-math"]
    link_args = []
    sanitize = os.environ.get("GLOFND_SANITIZE", "").strip()
    if sanitize:
        compile_args += ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
                         "-fno-sanitize-recover=all"]
        link_args += [f"-fsanitize={sanitize}"]
    elif flag("GLOFND_DEBUG"):
        compile_args += ["-O0", "-g", "-UNDEBUG"]
    else:
        compile_args += ["-O3"]
    if flag("GLOFND_WERROR"):
        compile_args += ["-Werror"]
    if flag("GLOFND_NATIVE"):
        compile_args += ["-march=native"]
    if not flag("GLOFND_NO_OPENMP") and compiler_accepts(["-fopenmp"]):
        compile_args += ["-fopenmp"]
        link_args += ["-fopenmp"]
    return Extension(
        "glofnd._C",
        sources=["csrc/threshold.c", "csrc/loss.c", "csrc/module.c"],
        depends=["csrc/glofnd.h", "csrc/step_impl.h", "csrc/rows_avx512.h", "csrc/loss_impl.h",
                 "csrc/loss_vec.h", "csrc/internal.h"],
        include_dirs=["csrc", numpy.get_include()],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        optional=not flag("GLOFND_WERROR"),
    )


setup(ext_modules=[] if flag("GLOFND_NO_EXTENSION") else [extension()])
