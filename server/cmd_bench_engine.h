/* cmd_bench_engine.h: `kvserve bench --concurrency N ...`, the offline
 * benchmark of the continuous-batching engine (cmd_bench.c hands over to it
 * when --concurrency is given). */
#ifndef SRV_CMD_BENCH_ENGINE_H
#define SRV_CMD_BENCH_ENGINE_H

/* argv[0] is "bench". Returns the process exit status (0, 1 runtime error,
 * 2 usage error). */
int cmd_bench_engine(int argc, char **argv);

#endif
