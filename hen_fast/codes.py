"""The integer codes that name a similarity and a separation wherever Python hands a call to a
kernel (the C++ and CUDA ops, the Triton kernels).

This module is their only definition. The compiled kernels read them from a C header that
``setup.py`` (and the tests that compile ``csrc/`` directly) writes from :func:`c_header`, and the
Triton kernels import them from here, so a code can never mean one thing in Python and another in
a kernel. It imports nothing, so a build script can load it by path.
"""

# The vocabulary of hen_fast.retrieve.
SIMILARITIES = ("dot", "l2", "manhattan")
SEPARATIONS = ("softmax", "sparsemax", "entmax", "polynomial")

SIMILARITY_CODES = {"dot": 0, "l2": 1, "manhattan": 2}
# sparsemax is entmax with alpha = 2: the kernels know one sparse family.
SEPARATION_CODES = {"softmax": 0, "polynomial": 1, "entmax": 2}


def similarity_code(name: str) -> int:
    return SIMILARITY_CODES[name]


def separation_code(name: str) -> int:
    return SEPARATION_CODES["entmax" if name == "sparsemax" else name]


def c_header() -> str:
    """The codes as a C/C++/CUDA header (constants in namespace ``hen_fast::codes``)."""
    lines = [
        "// Generated from hen_fast/codes.py by setup.py; do not edit.",
        "#pragma once",
        "#include <cstdint>",
        "namespace hen_fast {",
        "namespace codes {",
    ]
    for kind, table in (("Similarity", SIMILARITY_CODES), ("Separation", SEPARATION_CODES)):
        for name, code in table.items():
            camel = "".join(part.capitalize() for part in name.split("_"))
            lines.append(f"constexpr int k{kind}{camel} = {code};")
        lines.append(f"constexpr int k{kind}Count = {len(table)};")
    lines += ["}  // namespace codes", "}  // namespace hen_fast", ""]
    return "\n".join(lines)
