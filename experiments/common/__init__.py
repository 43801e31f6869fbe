"""Code the experiment scripts share. A script reaches it with one line, experiments/ on sys.path:

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/, for common/
    from common.results_io import write_results

mtp_jax itself is imported as the installed package (`pip install -e .`)."""
