"""Text-embedding cache: memory LRU, then Redis, then the workers (misses only, batched).

Key: model identity (`Predictor.model_id`: config + checkpoint hash) + prompt policy + normalised text.
Values are raw little-endian float32 bytes, never pickles. Redis is optional and never fails a request:
an error or a slow answer is logged, counted as `result="error"`, and Redis is skipped for a few
seconds while the service carries on with memory only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.metrics import Metrics

logger = logging.getLogger("openset.cache")

REDIS_TIMEOUT_S = 0.1  # a slower Redis counts as down
REDIS_RETRY_AFTER_S = 2.0  # how long Redis is skipped after an error
REDIS_TTL_S = 7 * 24 * 3600
PROMPT_POLICY = "templates81-mean"  # encode_texts averages 81 prompt templates

Compute = Callable[[list[str]], Awaitable[np.ndarray]]


def normalise_text(text: str) -> str:
    """NFKC, lower case, single spaces: the text the encoder sees and the cache key is built from."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


class TextEmbeddingCache:
    def __init__(self, capacity: int, redis_url: str | None, metrics: Metrics) -> None:
        self.capacity = capacity
        self.metrics = metrics
        self.memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.redis = (
            aioredis.Redis.from_url(
                redis_url,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
            if redis_url
            else None
        )
        self._redis_skip_until = 0.0
        self._pending: dict[str, asyncio.Future] = {}

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    @staticmethod
    def key(model_id: str, text: str) -> str:
        digest = hashlib.sha256(text.encode()).hexdigest()
        return f"openset:text:{model_id}:{PROMPT_POLICY}:{digest}"

    async def embeddings(self, model_id: str, texts: list[str], compute: Compute) -> np.ndarray:
        """(N, D) float32 class embeddings of normalised `texts`; only misses of both tiers are computed."""
        keys = [self.key(model_id, text) for text in texts]
        found = self._memory_get(keys)
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            from_redis = await self._redis_get(missing)
            found.update(from_redis)
            self._memory_put(from_redis)
            missing = [k for k in missing if k not in from_redis]
        if missing:
            found.update(await self._compute(missing, dict(zip(keys, texts, strict=True)), compute))
        return np.stack([found[k] for k in keys])

    async def _compute(
        self, keys: list[str], texts: dict[str, str], compute: Compute
    ) -> dict[str, np.ndarray]:
        """Compute the keys nobody is computing yet; wait for the ones already in flight."""
        waiting = {k: self._pending[k] for k in keys if k in self._pending}
        mine = [k for k in keys if k not in waiting]
        loop = asyncio.get_running_loop()
        futures = {k: loop.create_future() for k in mine}
        self._pending.update(futures)
        try:
            if mine:
                vectors = await compute([texts[k] for k in mine])
                computed = dict(zip(mine, vectors.astype(np.float32), strict=True))
                self._memory_put(computed)
                for k, vector in computed.items():
                    futures[k].set_result(vector)
                await self._redis_set(computed)
        except BaseException as exc:
            for future in futures.values():
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            for k in mine:
                self._pending.pop(k, None)
        result = {k: futures[k].result() for k in mine}
        for k, future in waiting.items():
            result[k] = await asyncio.shield(future)
        return result

    # -- memory tier -------------------------------------------------------------------------------

    def _memory_get(self, keys: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for k in keys:
            vector = self.memory.get(k)
            if vector is not None:
                self.memory.move_to_end(k)
                found[k] = vector
        self.metrics.text_cache.labels("memory", "hit").inc(len([k for k in keys if k in found]))
        self.metrics.text_cache.labels("memory", "miss").inc(len([k for k in keys if k not in found]))
        return found

    def _memory_put(self, vectors: dict[str, np.ndarray]) -> None:
        for k, vector in vectors.items():
            self.memory[k] = vector
            self.memory.move_to_end(k)
        while len(self.memory) > self.capacity:
            self.memory.popitem(last=False)

    # -- redis tier --------------------------------------------------------------------------------

    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_skip_until

    def _redis_failed(self, operation: str, exc: BaseException, count: int) -> None:
        if time.monotonic() >= self._redis_skip_until:
            logger.warning(
                "redis unavailable; using the memory cache only",
                extra={"operation": operation, "error": f"{type(exc).__name__}: {exc}"},
            )
        self._redis_skip_until = time.monotonic() + REDIS_RETRY_AFTER_S
        self.metrics.text_cache.labels("redis", "error").inc(count)

    async def _redis_get(self, keys: list[str]) -> dict[str, np.ndarray]:
        if self.redis is None:
            return {}
        if not self._redis_usable():
            self.metrics.text_cache.labels("redis", "error").inc(len(keys))
            return {}
        try:
            values = await asyncio.wait_for(self.redis.mget(keys), REDIS_TIMEOUT_S)
        except Exception as exc:  # connection refused, timeout, protocol error: never fail the request
            self._redis_failed("get", exc, len(keys))
            return {}
        found = {}
        for k, value in zip(keys, values, strict=True):
            if value is not None and len(value) % 4 == 0 and len(value) > 0:
                found[k] = np.frombuffer(value, dtype="<f4").copy()
        self.metrics.text_cache.labels("redis", "hit").inc(len(found))
        self.metrics.text_cache.labels("redis", "miss").inc(len(keys) - len(found))
        return found

    async def _redis_set(self, vectors: dict[str, np.ndarray]) -> None:
        if not vectors or not self._redis_usable():
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for k, vector in vectors.items():
                    pipe.set(k, vector.astype("<f4").tobytes(), ex=REDIS_TTL_S)
                await asyncio.wait_for(pipe.execute(), REDIS_TIMEOUT_S)
        except Exception as exc:
            self._redis_failed("set", exc, 1)
