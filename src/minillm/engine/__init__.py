from .block_manager import BlockManager
from .llm_engine import EngineConfig, LLMEngine, PromptLimits, RequestFailed, StepOutput
from .scheduler import Scheduler
from .sequence import Sequence

__all__ = ["BlockManager", "EngineConfig", "LLMEngine", "PromptLimits", "RequestFailed", "Scheduler", "Sequence", "StepOutput"]
