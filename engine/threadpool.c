/* threadpool.c: the fixed pool of compute workers behind eng_threadpool_run()
 * (contract in engine/threadpool.h).
 *
 * A job is published as one 64-bit word: the job's epoch in the high 32 bits
 * and the next unclaimed task in the low 32. Workers claim tasks with a
 * compare-and-swap that only succeeds while the word still carries the epoch
 * they saw, so a late worker can never take a task of a newer job. A job's
 * description sits in one of two slots chosen by the epoch's parity: a worker
 * that loaded the word of job e-1 just before job e was prepared still reads
 * e-1's task count, so its claim fails rather than running task k of the wrong
 * job. The caller (worker 0) claims tasks like everyone else, then waits until
 * the job's done counter reaches n_tasks. Between jobs workers spin (pausing) for a short
 * while, because the forward pass issues jobs every few microseconds, and then
 * sleep on a condition variable so that an idle engine costs no CPU. */
#include "engine/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* How long a worker keeps spinning for the next job before it sleeps. */
#define SPIN_NS 200000ull
/* Pause iterations between clock reads while spinning. */
#define SPIN_CHECK 64
/* Pause iterations the caller waits for stragglers before yielding the core
 * (a worker may have been preempted on a busy machine). */
#define WAIT_YIELD 4096

typedef struct {
    struct eng_threadpool *tp;
    int id;
} worker_arg;

struct eng_threadpool {
    int n_threads;
    pthread_t *threads;  /* (n_threads - 1) */
    worker_arg *args;    /* (n_threads - 1) */

    /* The current job. The caller fills slot[epoch & 1] before it publishes
     * a new epoch in `word`, and only after the previous job's tasks are all
     * done. */
    _Atomic uint64_t word;   /* epoch << 32 | next task */
    struct {
        _Atomic(eng_task_fn) fn;
        _Atomic(void *) ctx;
        _Atomic int n_tasks;
    } slot[2];
    _Atomic int n_done;
    _Atomic int stop;

    /* Sleeping workers wait on `wake`; the caller only takes the lock when
     * n_sleeping says someone sleeps. */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    _Atomic int n_sleeping;
};

static uint32_t epoch_of(uint64_t word) {
    return (uint32_t)(word >> 32);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Claims and runs tasks of job `epoch` until none is left. */
static void work(struct eng_threadpool *tp, uint32_t epoch, int worker) {
    const int n_tasks = atomic_load_explicit(&tp->slot[epoch & 1].n_tasks, memory_order_relaxed);
    uint64_t w = atomic_load_explicit(&tp->word, memory_order_acquire);
    for (;;) {
        if (epoch_of(w) != epoch)
            return;
        int task = (int)(uint32_t)w;
        if (task >= n_tasks)
            return;
        if (!atomic_compare_exchange_weak_explicit(&tp->word, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        /* The claim succeeded, so job `epoch` is still current and cannot be
         * replaced before this task is counted done: fn and ctx are its own. */
        eng_task_fn fn = atomic_load_explicit(&tp->slot[epoch & 1].fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&tp->slot[epoch & 1].ctx, memory_order_relaxed);
        fn(ctx, task, worker);
        atomic_fetch_add_explicit(&tp->n_done, 1, memory_order_release);
        w = atomic_load_explicit(&tp->word, memory_order_acquire);
    }
}

/* Waits until a job newer than `seen` is published (or the pool stops) and
 * returns its epoch. */
static uint32_t wait_for_job(struct eng_threadpool *tp, uint32_t seen) {
    uint32_t e;
    const uint64_t start = now_ns();
    for (;;) {
        for (int i = 0; i < SPIN_CHECK; i++) {
            e = epoch_of(atomic_load_explicit(&tp->word, memory_order_acquire));
            if (e != seen || atomic_load_explicit(&tp->stop, memory_order_relaxed))
                return e;
            cpu_relax();
        }
        if (now_ns() - start > SPIN_NS)
            break;
    }
    pthread_mutex_lock(&tp->lock);
    atomic_fetch_add(&tp->n_sleeping, 1);  /* seq_cst: pairs with run()'s publish */
    while ((e = epoch_of(atomic_load(&tp->word))) == seen && !atomic_load(&tp->stop))
        pthread_cond_wait(&tp->wake, &tp->lock);
    atomic_fetch_sub(&tp->n_sleeping, 1);
    pthread_mutex_unlock(&tp->lock);
    return e;
}

static void *worker_main(void *p) {
    worker_arg *a = p;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_for_job(a->tp, seen);
        if (atomic_load_explicit(&a->tp->stop, memory_order_acquire))
            return NULL;
        work(a->tp, seen, a->id);
    }
}

/* Publishes a new word (a job, or the stop signal) and wakes sleepers. */
static void publish(struct eng_threadpool *tp, uint64_t word) {
    atomic_store(&tp->word, word);  /* seq_cst: pairs with wait_for_job */
    if (atomic_load(&tp->n_sleeping) > 0) {
        pthread_mutex_lock(&tp->lock);
        pthread_cond_broadcast(&tp->wake);
        pthread_mutex_unlock(&tp->lock);
    }
}

static void stop_workers(struct eng_threadpool *tp, int n_started) {
    atomic_store(&tp->stop, 1);
    uint64_t w = atomic_load(&tp->word);
    publish(tp, (uint64_t)(epoch_of(w) + 1) << 32);
    for (int i = 0; i < n_started; i++)
        pthread_join(tp->threads[i], NULL);
}

eng_threadpool *eng_threadpool_create(int n_threads) {
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    struct eng_threadpool *tp = calloc(1, sizeof *tp);
    if (!tp)
        return NULL;
    tp->n_threads = n_threads;
    tp->threads = calloc((size_t)n_threads, sizeof *tp->threads);
    tp->args = calloc((size_t)n_threads, sizeof *tp->args);
    if (!tp->threads || !tp->args) {
        free(tp->threads);
        free(tp->args);
        free(tp);
        return NULL;
    }
    pthread_mutex_init(&tp->lock, NULL);
    pthread_cond_init(&tp->wake, NULL);
    for (int i = 0; i < n_threads - 1; i++) {
        tp->args[i] = (worker_arg){.tp = tp, .id = i + 1};
        if (pthread_create(&tp->threads[i], NULL, worker_main, &tp->args[i]) != 0) {
            stop_workers(tp, i);
            pthread_cond_destroy(&tp->wake);
            pthread_mutex_destroy(&tp->lock);
            free(tp->threads);
            free(tp->args);
            free(tp);
            return NULL;
        }
    }
    return tp;
}

void eng_threadpool_destroy(eng_threadpool *tp) {
    if (!tp)
        return;
    stop_workers(tp, tp->n_threads - 1);
    pthread_cond_destroy(&tp->wake);
    pthread_mutex_destroy(&tp->lock);
    free(tp->threads);
    free(tp->args);
    free(tp);
}

int eng_threadpool_size(const eng_threadpool *tp) {
    return tp ? tp->n_threads : 1;
}

void eng_threadpool_run(eng_threadpool *tp, eng_task_fn fn, void *ctx, int n_tasks) {
    if (n_tasks <= 0)
        return;
    if (!tp || tp->n_threads == 1 || n_tasks == 1) {
        for (int i = 0; i < n_tasks; i++)
            fn(ctx, i, 0);
        return;
    }
    /* Every task of the previous job is done; the slot written here belongs
     * to the job before it, whose epoch no claim can match any more. */
    const uint32_t epoch = epoch_of(atomic_load_explicit(&tp->word, memory_order_relaxed)) + 1;
    atomic_store_explicit(&tp->slot[epoch & 1].fn, fn, memory_order_relaxed);
    atomic_store_explicit(&tp->slot[epoch & 1].ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&tp->slot[epoch & 1].n_tasks, n_tasks, memory_order_relaxed);
    atomic_store_explicit(&tp->n_done, 0, memory_order_relaxed);
    publish(tp, (uint64_t)epoch << 32);
    work(tp, epoch, 0);
    for (int spins = 0; atomic_load_explicit(&tp->n_done, memory_order_acquire) < n_tasks;) {
        if (++spins < WAIT_YIELD) {
            cpu_relax();
        } else {
            sched_yield();
            spins = 0;
        }
    }
}
