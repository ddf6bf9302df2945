"""The names of the quantization recipes, torch-free, for help texts that must print fast.

``dpquant_sim.nn.config.RECIPES`` is the registry (it needs torch); this tuple mirrors its keys in order, and
``tests/test_presets.py::test_recipe_names_mirror_the_registry`` fails when the two disagree.

>>> "luq_fp4" in RECIPE_NAMES
True
"""

RECIPE_NAMES: tuple[str, ...] = (
    "fp8", "fp6", "fp4", "mxfp8", "mxfp6", "mxfp4", "nvfp4", "int8", "int4",
    "luq_fp4", "luq_fp4_wtensor", "luq_fp4_batch",
)
