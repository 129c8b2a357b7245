/* Batched positional reads for edgeinfer's storage layer.
 *
 * Python pays tens of microseconds per read call; a token's batch of neuron
 * reads is hundreds of calls. This loop issues them from C, on a few pthreads
 * pulling work from a shared counter, and reports per request how many bytes
 * arrived (or -errno). Retrying, error messages and accounting stay in Python:
 * a request that comes back short is simply redone there.
 *
 * Built at first use by native/loader.py: cc -O2 -shared -fPIC -pthread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define EI_MAX_THREADS 64

typedef struct {
    int fd;
    int64_t n;
    const int64_t *offsets;
    const int64_t *lengths;
    const uint64_t *dests;
    int64_t align;
    int64_t *status;
    int64_t *calls;
    int64_t next;
} ei_batch;

/* Read request i fully. After a short read, continue from the last aligned
 * point (O_DIRECT needs aligned offsets, lengths and addresses); stop at EOF
 * or when a read makes no progress. */
static void ei_read_one(ei_batch *b, int64_t i)
{
    char *dst = (char *)(uintptr_t)b->dests[i];
    int64_t off = b->offsets[i], len = b->lengths[i], done = 0, calls = 0;
    while (done < len) {
        int64_t start = done - done % b->align;
        ssize_t r = pread(b->fd, dst + start, (size_t)(len - start), (off_t)(off + start));
        calls++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            b->status[i] = -(int64_t)errno;
            b->calls[i] = calls;
            return;
        }
        if (start + r <= done)
            break;
        done = start + r;
    }
    b->status[i] = done;
    b->calls[i] = calls;
}

static void *ei_worker(void *arg)
{
    ei_batch *b = (ei_batch *)arg;
    for (;;) {
        int64_t i = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (i >= b->n)
            return NULL;
        ei_read_one(b, i);
    }
}

/* Read n requests (offsets[i], lengths[i]) of fd into dests[i] on up to
 * nthreads threads (the caller's thread is one of them). status[i] receives
 * the bytes read (fewer than lengths[i] at EOF) or -errno; calls[i] the
 * number of pread calls. Returns the number of threads used. */
int ei_pread_batch(int fd, int64_t n, const int64_t *offsets, const int64_t *lengths,
                   const uint64_t *dests, int64_t align, int nthreads,
                   int64_t *status, int64_t *calls)
{
    pthread_t tid[EI_MAX_THREADS];
    ei_batch b = {fd, n, offsets, lengths, dests, align > 0 ? align : 1,
                  status, calls, 0};
    int started = 0;
    if (nthreads > EI_MAX_THREADS)
        nthreads = EI_MAX_THREADS;
    if (nthreads > n)
        nthreads = (int)n;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tid[started], NULL, ei_worker, &b) != 0)
            break;  /* fewer threads is still correct */
        started++;
    }
    ei_worker(&b);
    for (int t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
    return started + 1;
}

/* n copies src[i] -> dst[i] of len[i] bytes: staging buffer to destination. */
void ei_copy_batch(int64_t n, const uint64_t *src, const uint64_t *dst, const int64_t *len)
{
    for (int64_t i = 0; i < n; i++)
        memcpy((void *)(uintptr_t)dst[i], (const void *)(uintptr_t)src[i], (size_t)len[i]);
}

int ei_abi_version(void)
{
    return 1;
}
