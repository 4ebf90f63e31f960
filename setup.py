from setuptools import setup

setup(
    name="cpdfx",
    version=open("cpdfx/version.py", encoding="utf-8").read().split('"')[1],
    description="Compile-time structured pruning of PyTorch vision models on torch.fx graphs",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # passes/ is the graph-pass folder of the design; it installs as cpdfx.passes through
    # the link cpdfx/passes -> ../passes, so no top-level `passes` lands in site-packages
    packages=["cpdfx", "cpdfx.passes", "cpdfx.passes.ops"],
    python_requires=">=3.10",
    # torch is pinned in constraints.txt (the CPU wheel); see README
    install_requires=["torch>=2.10", "numpy", "onnx", "onnxruntime", "onnxscript", "sympy", "tqdm", "pillow",
                      "scikit-learn", "matplotlib", "safetensors"],
    extras_require={"test": ["pytest", "hypothesis", "transformers>=5", "scipy"],
                    "bench": ["transformers>=5", "torch-pruning", "scipy"]},
    scripts=["bin/cpdfx"],  # not an entry point: see the script
)
