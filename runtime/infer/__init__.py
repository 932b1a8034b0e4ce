"""The pipelined, crash-safe inference runner behind ``ami-infer``, ``--slides`` and the Python API.

One module per concept:

* :mod:`.inputs`: crop paths from folders, files and lists (:func:`iter_inputs`), :class:`InputError`;
* :mod:`.decode`: the decoding workers and the input source protocol (:class:`CropFiles`);
* :mod:`.cells` and :mod:`.formats`: the row schema, cell encoding and the output-format registry
  (:data:`FORMATS`: CSV and JSON Lines, for files and streams alike);
* :mod:`.scan`: resume scanning (what an existing output holds, a cut last row);
* :mod:`.record`: the run record ``OUT.ami.json``;
* :mod:`.writer`: the sinks (the locked file / stream writer, the in-memory sink);
* :mod:`.report`: the progress line and the :class:`Summary`;
* :mod:`.pipeline`: :func:`run_inference`, which composes them.
"""

from __future__ import annotations

from ..imageio import MAX_PIXELS
from .cells import COLUMNS, FORMULA_STARTS, LEGACY_COLUMNS, csv_cell, csv_uncell, json_str
from .decode import POOLS, CropFiles, crop_note, decode_pool, default_workers, prepare_batch
from .formats import (
           DEFAULT_FORMAT,
           FORMAT_NAMES,
           FORMATS,
           Format,
           format_for,
           format_rows,
           read_results,
           row_dicts,
           scan_output,
)
from .inputs import ENCODING, IMAGE_SUFFIXES, LIST_SUFFIXES, InputError, iter_inputs, read_list_file
from .pipeline import InferenceFault, InferenceOptions, RowTap, check_probabilities, run, run_inference
from .record import RECORD_SUFFIX, model_record, read_record, record_path
from .report import ProgressLine, Summary
from .scan import Scan
from .writer import MemorySink, ResultWriter, check_output, is_stream

__all__ = ["COLUMNS", "DEFAULT_FORMAT", "ENCODING", "FORMATS", "FORMAT_NAMES", "FORMULA_STARTS", "IMAGE_SUFFIXES", "LEGACY_COLUMNS",
           "LIST_SUFFIXES", "MAX_PIXELS", "POOLS", "RECORD_SUFFIX", "CropFiles", "Format", "InferenceFault",
           "InferenceOptions", "InputError", "MemorySink", "ProgressLine", "ResultWriter", "RowTap", "Scan", "Summary",
           "check_output", "check_probabilities", "crop_note", "csv_cell", "csv_uncell", "decode_pool",
           "default_workers", "format_for", "format_rows", "is_stream", "iter_inputs", "json_str", "model_record",
           "prepare_batch", "read_list_file", "read_record", "read_results", "record_path", "row_dicts", "run",
           "run_inference", "scan_output"]
