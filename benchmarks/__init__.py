"""edgepack's benchmark suite: edgepack's bundles against the usual optimum + onnxruntime recipes.

usage: python -m benchmarks.compare [--quick] [--out benchmarks/results.md]
       python -m benchmarks.llm [--bundle LABEL=PATH ...]   (decoders: vs onnxruntime-genai)
"""
