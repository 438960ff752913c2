"""Verification engine: structural (files, sizes, checksums), numerical (vs source tensors),
end to end (logits vs a reference model)."""

from .end_to_end import compare_logits, e2e_failures, format_e2e, verify_end_to_end
from .numerical import format_table, verify_numerics
from .structural import Problem, StructuralReport, verify_structure

__all__ = ["verify_structure", "StructuralReport", "Problem", "verify_numerics", "format_table",
           "verify_end_to_end", "compare_logits", "e2e_failures", "format_e2e"]
