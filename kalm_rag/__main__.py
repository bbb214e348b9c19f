"""``python -m kalm_rag``: the ``kalm-rag`` command line."""

from kalm_rag.cli import main

if __name__ == "__main__":
    main()
