"""How histohub's encoders are made and benchmarked: SimCLR pretraining (``simclr``), the
downstream benchmarks (``downstream``) and the scripts' shared error handling
(``cli_errors``). Run through the scripts beside this package (``python
training/run_pretrain.py``, ``python training/run_benchmark.py``); imports histohub only
through its public names."""
