"""Tools above both models: the converter (``mixer-convert`` and its ``--verify``), the parity
harness and report (``mixer-parity``), the timm oracle script and the demo (``mixer-demo``).
Nothing in the framework-free core (``mixer_convert.*`` outside this package) or in the two
model packages imports from here."""
