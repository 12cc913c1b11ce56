from .block_manager import BlockManager
from .llm_engine import LLMEngine, PromptLimits, RequestFailed, RequestOutput, StepOutput
from .scheduler import Scheduler
from .sequence import Sequence
from .settings import EngineConfig

__all__ = ["BlockManager", "EngineConfig", "LLMEngine", "PromptLimits", "RequestFailed", "RequestOutput", "Scheduler", "Sequence", "StepOutput"]
