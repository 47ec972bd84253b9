"""The folded checkpoint format: its self-contained runtime (modeling_foldgpt, bundled into every folder for
`trust_remote_code`), writing and reading folded folders (folded), dense export to the base architecture
(export), and the registration that lets AutoConfig / AutoModelForCausalLM load folded folders once foldgpt
is imported (auto)."""
