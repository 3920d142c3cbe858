"""``python -m ironpool demo``: seed 000's per-file pandas job, run four ways.

Each CSV file is read with pandas, aggregated by key, and both the small
summary and the full DataFrame come back to the caller, which concatenates
them: the job whose results, pickled back by ``ProcessPoolExecutor``, end in
``BufferError: memoryview has 1 exported buffer`` in the article. The four
ways, each in a fresh Python process that imported pandas, as a script would:

* a plain loop in one process (what parallelism has to beat);
* ``ProcessPoolExecutor`` returning the DataFrames;
* ``ProcessPoolExecutor`` with the article's workaround:
  ``df.to_dict(orient="records")`` in the worker, ``pd.DataFrame(records)``
  in the caller;
* ``ironpool.Pool`` returning the DataFrames (through shared memory), with a
  progress bar.

It prints seconds (median of the runs), the caller's peak memory, and
whether each result is identical to the loop's. Needs pandas, pyarrow and
tqdm (``pip install 'ironpool[demo]'``); ``--small`` runs a size for CI.
"""
