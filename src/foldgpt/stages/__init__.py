"""The method's stages and the tensor math under them: redundancy analysis (analysis), gated block removal
(gates), the parameter budget (budget), fold costs and groups (fold), closed-form fits of children (fit), model
surgery (structure), copies that share frozen weights (weights), training-free compensation of deleted spans
(compensate), and the cure (cure) with its mergeable adapters (lora). The methods (foldgpt.methods) combine them
into plans; pipeline.py applies a plan, compensates and cures."""
