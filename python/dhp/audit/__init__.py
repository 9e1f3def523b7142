"""dhp.audit: tools that check dhp's guarantees on the library that is installed (docs/SECURITY.md).

    python -m dhp.audit sass [--lib PATH] [--json OUT]    static taint check of every kernel's SASS

- `sass`: a dataflow analysis over the disassembled kernels; fails a kernel whose branches, memory
  addresses or synchronisation depend on tensor values (rules in dhp.audit.sass). Needs cuobjdump and
  nvdisasm (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm), no GPU.
- `stats`: Welch's t-test with dudect-style percentile cropping, for the fixed-vs-random timing test.
"""
