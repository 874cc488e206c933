"""Test helpers, outside the test namespace (pytest collects only tests/test_*.py): builders of
checkpoints, images and hostile files, oracles (TensorFlow's kernels, TensorBoard's reader),
small training configs and the training worker script. Fixtures live in tests/conftest.py."""
