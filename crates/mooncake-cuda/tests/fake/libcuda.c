/*
 * A fake CUDA driver (libcuda.so) for testing mooncake-cuda's logic on hosts without a GPU.
 *
 * Only the driver calls mooncake-cuda makes are implemented. "Device memory" is a memfd
 * mapped twice: the address handed out as the device pointer is mapped PROT_NONE, so any CPU
 * access to device memory faults (the code under test must only move it with the driver's
 * copies), and a private read-write "shadow" mapping is what the fake's copies use. Streams
 * are worker threads that run copies and event records in order, so completions really are
 * asynchronous. IPC handles name the exporter's pid and memfd: the importer opens
 * /proc/<pid>/fd/<fd>, which fails once the exporter has exited, as with real handles.
 *
 * Environment: FAKE_CUDA_DEVICES (default 2), FAKE_CUDA_COPY_DELAY_US (a delay per async
 * copy, default 20).
 *
 * Build: cc -shared -fPIC -O2 -o libcuda.so libcuda.c -lpthread
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef struct Stream *CUstream;
typedef struct Event *CUevent;
typedef struct {
    char reserved[64];
} CUipcMemHandle;
typedef struct {
    char bytes[16];
} CUuuid;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_UNKNOWN = 999,
};

#define MAX_DEV 8
#define CTX_BASE ((uintptr_t)0xc0de0000)

static int g_init;
static int g_devices = 2;
static int g_delay_us = 20;
static int g_peer[MAX_DEV][MAX_DEV];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static __thread int t_depth;
static __thread uintptr_t t_stack[32];

static int current_ctx(void) {
    if (t_depth <= 0 || t_stack[t_depth - 1] == 0) return -1;
    return (int)(t_stack[t_depth - 1] - CTX_BASE);
}

/* ---- allocations ------------------------------------------------------------------ */

struct Alloc {
    uint64_t dev;    /* the PROT_NONE address handed out */
    char *shadow;    /* the read-write mapping the fake copies with */
    size_t size;
    int ordinal;
    int fd;          /* the memfd (exported in IPC handles) */
    int imported;    /* opened from another process's handle */
    struct Alloc *next;
};

struct Pinned {
    uint64_t base;
    size_t size;
    int owned; /* from cuMemHostAlloc (else cuMemHostRegister) */
    struct Pinned *next;
};

static struct Alloc *g_allocs;
static struct Pinned *g_pinned;

static struct Alloc *find_alloc(uint64_t p) {
    for (struct Alloc *a = g_allocs; a; a = a->next)
        if (p >= a->dev && p < a->dev + a->size) return a;
    return NULL;
}

static struct Pinned *find_pinned(uint64_t p) {
    for (struct Pinned *x = g_pinned; x; x = x->next)
        if (p >= x->base && p < x->base + x->size) return x;
    return NULL;
}

/* The address the fake reads or writes for `p` (the shadow for device memory). */
static char *translate(uint64_t p, size_t len, int *ok) {
    pthread_mutex_lock(&g_lock);
    struct Alloc *a = find_alloc(p);
    char *r;
    *ok = 1;
    if (a) {
        if (p + len > a->dev + a->size) *ok = 0;
        r = a->shadow + (p - a->dev);
    } else {
        r = (char *)(uintptr_t)p;
    }
    pthread_mutex_unlock(&g_lock);
    return r;
}

static CUresult map_fd(int fd, size_t size, int ordinal, int imported, CUdeviceptr *out) {
    void *dev = mmap(NULL, size, PROT_NONE, MAP_SHARED, fd, 0);
    if (dev == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    void *shadow = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (shadow == MAP_FAILED) {
        munmap(dev, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    struct Alloc *a = calloc(1, sizeof *a);
    a->dev = (uint64_t)(uintptr_t)dev;
    a->shadow = shadow;
    a->size = size;
    a->ordinal = ordinal;
    a->fd = fd;
    a->imported = imported;
    pthread_mutex_lock(&g_lock);
    a->next = g_allocs;
    g_allocs = a;
    pthread_mutex_unlock(&g_lock);
    *out = a->dev;
    return CUDA_SUCCESS;
}

static CUresult unmap(uint64_t p, int imported) {
    pthread_mutex_lock(&g_lock);
    struct Alloc **pp = &g_allocs;
    while (*pp && !((*pp)->dev == p && (*pp)->imported == imported)) pp = &(*pp)->next;
    struct Alloc *a = *pp;
    if (!a) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pp = a->next;
    pthread_mutex_unlock(&g_lock);
    munmap((void *)(uintptr_t)a->dev, a->size);
    munmap(a->shadow, a->size);
    close(a->fd);
    free(a);
    return CUDA_SUCCESS;
}

/* ---- streams and events ------------------------------------------------------------- */

struct Event {
    pthread_mutex_t m;
    pthread_cond_t c;
    uint64_t recorded, completed;
    int ordinal;
};

enum { OP_COPY, OP_EVENT, OP_MARK };

struct Op {
    int kind;
    char *dst;
    const char *src;
    size_t len;
    struct Event *ev;
    uint64_t seq;
    struct Op *next;
};

struct Stream {
    pthread_mutex_t m;
    pthread_cond_t c;
    struct Op *head, *tail;
    int ordinal;
    pthread_t thread;
};

static void complete_event(struct Event *e, uint64_t seq) {
    pthread_mutex_lock(&e->m);
    if (seq > e->completed) e->completed = seq;
    pthread_cond_broadcast(&e->c);
    pthread_mutex_unlock(&e->m);
}

static void *stream_main(void *arg) {
    struct Stream *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->m);
        while (!s->head) pthread_cond_wait(&s->c, &s->m);
        struct Op *op = s->head;
        pthread_mutex_unlock(&s->m);
        if (op->kind == OP_COPY) {
            if (g_delay_us > 0) usleep(g_delay_us);
            memmove(op->dst, op->src, op->len);
        } else {
            complete_event(op->ev, op->seq);
        }
        pthread_mutex_lock(&s->m);
        s->head = op->next;
        if (!s->head) s->tail = NULL;
        pthread_mutex_unlock(&s->m);
        free(op);
    }
    return NULL;
}

static void push(struct Stream *s, struct Op *op) {
    pthread_mutex_lock(&s->m);
    op->next = NULL;
    if (s->tail)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    pthread_cond_signal(&s->c);
    pthread_mutex_unlock(&s->m);
}

/* ---- the API -------------------------------------------------------------------------- */

#define NEED_INIT() \
    do { \
        if (!g_init) return CUDA_ERROR_NOT_INITIALIZED; \
    } while (0)
#define NEED_CTX() \
    do { \
        NEED_INIT(); \
        if (current_ctx() < 0) return CUDA_ERROR_INVALID_CONTEXT; \
    } while (0)

CUresult cuGetErrorName(CUresult e, const char **s) {
    switch (e) {
    case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
    case CUDA_ERROR_NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuInit(unsigned flags) {
    (void)flags;
    const char *d = getenv("FAKE_CUDA_DEVICES");
    if (d) g_devices = atoi(d);
    if (g_devices > MAX_DEV) g_devices = MAX_DEV;
    const char *delay = getenv("FAKE_CUDA_COPY_DELAY_US");
    if (delay) g_delay_us = atoi(delay);
    g_init = 1;
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *v) {
    *v = 13000;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *n) {
    NEED_INIT();
    *n = g_devices;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    NEED_INIT();
    if (ordinal < 0 || ordinal >= g_devices) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
    NEED_INIT();
    if (d < 0 || d >= g_devices) return CUDA_ERROR_INVALID_DEVICE;
    *c = (CUcontext)(CTX_BASE + (uintptr_t)d);
    return CUDA_SUCCESS;
}

CUresult cuCtxPushCurrent_v2(CUcontext c) {
    NEED_INIT();
    if (t_depth >= 32) return CUDA_ERROR_UNKNOWN;
    t_stack[t_depth++] = (uintptr_t)c;
    return CUDA_SUCCESS;
}

CUresult cuCtxPopCurrent_v2(CUcontext *c) {
    NEED_INIT();
    if (t_depth <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    t_depth--;
    if (c) *c = (CUcontext)t_stack[t_depth];
    return CUDA_SUCCESS;
}

CUresult cuDeviceCanAccessPeer(int *can, CUdevice a, CUdevice b) {
    NEED_INIT();
    *can = a != b;
    return CUDA_SUCCESS;
}

CUresult cuCtxEnablePeerAccess(CUcontext peer, unsigned flags) {
    (void)flags;
    NEED_CTX();
    int me = current_ctx(), other = (int)((uintptr_t)peer - CTX_BASE);
    if (other < 0 || other >= g_devices) return CUDA_ERROR_INVALID_VALUE;
    if (g_peer[me][other]) return CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED;
    g_peer[me][other] = 1;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetPCIBusId(char *buf, int len, CUdevice d) {
    NEED_INIT();
    snprintf(buf, (size_t)len, "0000:%02X:00.0", 0x1b + 0x10 * d);
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) {
    NEED_INIT();
    for (int i = 0; i < 16; i++) u->bytes[i] = (char)(0xa0 + d + i);
    return CUDA_SUCCESS;
}

CUresult cuStreamCreate(CUstream *out, unsigned flags) {
    (void)flags;
    NEED_CTX();
    struct Stream *s = calloc(1, sizeof *s);
    pthread_mutex_init(&s->m, NULL);
    pthread_cond_init(&s->c, NULL);
    s->ordinal = current_ctx();
    pthread_create(&s->thread, NULL, stream_main, s);
    pthread_detach(s->thread);
    *out = s;
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream s) {
    NEED_CTX();
    struct Event e;
    memset(&e, 0, sizeof e);
    pthread_mutex_init(&e.m, NULL);
    pthread_cond_init(&e.c, NULL);
    struct Op *op = calloc(1, sizeof *op);
    op->kind = OP_MARK;
    op->ev = &e;
    op->seq = 1;
    push(s, op);
    pthread_mutex_lock(&e.m);
    while (e.completed < 1) pthread_cond_wait(&e.c, &e.m);
    pthread_mutex_unlock(&e.m);
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(CUevent *out, unsigned flags) {
    (void)flags;
    NEED_CTX();
    struct Event *e = calloc(1, sizeof *e);
    pthread_mutex_init(&e->m, NULL);
    pthread_cond_init(&e->c, NULL);
    e->ordinal = current_ctx();
    *out = e;
    return CUDA_SUCCESS;
}

CUresult cuEventRecord(CUevent e, CUstream s) {
    NEED_CTX();
    pthread_mutex_lock(&e->m);
    uint64_t seq = ++e->recorded;
    pthread_mutex_unlock(&e->m);
    struct Op *op = calloc(1, sizeof *op);
    op->kind = OP_EVENT;
    op->ev = e;
    op->seq = seq;
    push(s, op);
    return CUDA_SUCCESS;
}

CUresult cuEventQuery(CUevent e) {
    NEED_CTX();
    pthread_mutex_lock(&e->m);
    int done = e->completed >= e->recorded;
    pthread_mutex_unlock(&e->m);
    return done ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult cuEventSynchronize(CUevent e) {
    NEED_CTX();
    pthread_mutex_lock(&e->m);
    while (e->completed < e->recorded) pthread_cond_wait(&e->c, &e->m);
    pthread_mutex_unlock(&e->m);
    return CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(CUevent e) {
    NEED_CTX();
    /* Leaked on purpose: a stream may still complete it. */
    (void)e;
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr *out, size_t size) {
    NEED_CTX();
    if (size == 0) return CUDA_ERROR_INVALID_VALUE;
    int fd = memfd_create("fake-cuda", 0);
    if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
    if (ftruncate(fd, (off_t)size) != 0) {
        close(fd);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    return map_fd(fd, size, current_ctx(), 0, out);
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    NEED_CTX();
    return unmap(p, 0);
}

CUresult cuMemHostAlloc(void **out, size_t size, unsigned flags) {
    (void)flags;
    NEED_CTX();
    void *p = NULL;
    if (posix_memalign(&p, 4096, size) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    struct Pinned *x = calloc(1, sizeof *x);
    x->base = (uint64_t)(uintptr_t)p;
    x->size = size;
    x->owned = 1;
    pthread_mutex_lock(&g_lock);
    x->next = g_pinned;
    g_pinned = x;
    pthread_mutex_unlock(&g_lock);
    *out = p;
    return CUDA_SUCCESS;
}

static CUresult unpin(uint64_t base, int owned) {
    pthread_mutex_lock(&g_lock);
    struct Pinned **pp = &g_pinned;
    while (*pp && !((*pp)->base == base && (*pp)->owned == owned)) pp = &(*pp)->next;
    struct Pinned *x = *pp;
    if (x) *pp = x->next;
    pthread_mutex_unlock(&g_lock);
    if (!x) return CUDA_ERROR_INVALID_VALUE;
    if (owned) free((void *)(uintptr_t)x->base);
    free(x);
    return CUDA_SUCCESS;
}

CUresult cuMemFreeHost(void *p) {
    NEED_CTX();
    return unpin((uint64_t)(uintptr_t)p, 1);
}

CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned flags) {
    (void)flags;
    NEED_CTX();
    pthread_mutex_lock(&g_lock);
    int already = find_pinned((uint64_t)(uintptr_t)p) != NULL;
    if (!already) {
        struct Pinned *x = calloc(1, sizeof *x);
        x->base = (uint64_t)(uintptr_t)p;
        x->size = size;
        x->next = g_pinned;
        g_pinned = x;
    }
    pthread_mutex_unlock(&g_lock);
    return already ? CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED : CUDA_SUCCESS;
}

CUresult cuMemHostUnregister(void *p) {
    NEED_CTX();
    return unpin((uint64_t)(uintptr_t)p, 0);
}

CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr p) {
    NEED_CTX();
    pthread_mutex_lock(&g_lock);
    struct Alloc *a = find_alloc(p);
    struct Pinned *x = a ? NULL : find_pinned(p);
    pthread_mutex_unlock(&g_lock);
    if (!a && !x) return CUDA_ERROR_INVALID_VALUE;
    switch (attr) {
    case 2: /* MEMORY_TYPE */
        *(unsigned *)data = a ? 2 : 1;
        return CUDA_SUCCESS;
    case 9: /* DEVICE_ORDINAL */
        *(int *)data = a ? a->ordinal : 0;
        return CUDA_SUCCESS;
    default:
        return CUDA_ERROR_INVALID_VALUE;
    }
}

CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
    NEED_CTX();
    pthread_mutex_lock(&g_lock);
    struct Alloc *a = find_alloc(p);
    if (a) {
        if (base) *base = a->dev;
        if (size) *size = a->size;
    }
    pthread_mutex_unlock(&g_lock);
    return a ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

struct FakeHandle {
    char magic[8];
    int32_t pid, fd;
    uint64_t size;
    int32_t ordinal;
};

CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr p) {
    NEED_CTX();
    pthread_mutex_lock(&g_lock);
    struct Alloc *a = find_alloc(p);
    pthread_mutex_unlock(&g_lock);
    if (!a || a->imported) return CUDA_ERROR_INVALID_VALUE;
    struct FakeHandle f;
    memset(&f, 0, sizeof f);
    memcpy(f.magic, "FAKECUDA", 8);
    f.pid = getpid();
    f.fd = a->fd;
    f.size = a->size;
    f.ordinal = a->ordinal;
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, &f, sizeof f);
    return CUDA_SUCCESS;
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *out, CUipcMemHandle h, unsigned flags) {
    (void)flags;
    NEED_CTX();
    struct FakeHandle f;
    memcpy(&f, h.reserved, sizeof f);
    if (memcmp(f.magic, "FAKECUDA", 8) != 0) return CUDA_ERROR_INVALID_HANDLE;
    if (f.pid == getpid()) return CUDA_ERROR_INVALID_CONTEXT;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", f.pid, f.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return CUDA_ERROR_INVALID_HANDLE;
    CUresult r = map_fd(fd, f.size, f.ordinal, 1, out);
    if (getenv("FAKE_CUDA_DEBUG"))
        fprintf(stderr, "fake cuda: ipc open pid %d fd %d size %llu -> %llx\n", f.pid, f.fd,
                (unsigned long long)f.size, *out);
    return r;
}

CUresult cuIpcCloseMemHandle(CUdeviceptr p) {
    NEED_CTX();
    if (getenv("FAKE_CUDA_DEBUG")) fprintf(stderr, "fake cuda: ipc close %llx\n", p);
    return unmap(p, 1);
}

CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t len, CUstream s) {
    NEED_CTX();
    int ok1, ok2;
    char *d = translate(dst, len, &ok1);
    char *sp = translate(src, len, &ok2);
    if (getenv("FAKE_CUDA_DEBUG"))
        fprintf(stderr, "fake cuda: copy %zu bytes %llx -> %llx (shadow %p -> %p)\n", len, src, dst,
                (void *)sp, (void *)d);
    if (!ok1 || !ok2) return CUDA_ERROR_INVALID_VALUE;
    struct Op *op = calloc(1, sizeof *op);
    op->kind = OP_COPY;
    op->dst = d;
    op->src = sp;
    op->len = len;
    push(s, op);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t len) {
    NEED_CTX();
    int ok;
    char *d = translate(dst, len, &ok);
    if (!ok) return CUDA_ERROR_INVALID_VALUE;
    memmove(d, src, len);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t len) {
    NEED_CTX();
    int ok;
    const char *sp = translate(src, len, &ok);
    if (!ok) return CUDA_ERROR_INVALID_VALUE;
    memmove(dst, sp, len);
    return CUDA_SUCCESS;
}

CUresult cuMemGetHandleForAddressRange(void *handle, CUdeviceptr p, size_t size, int type,
                                       unsigned long long flags) {
    (void)flags;
    NEED_CTX();
    if (type != 1 || (p & 4095) || (size & 4095)) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct Alloc *a = find_alloc(p);
    int fd = a && p + size <= a->dev + a->size ? dup(a->fd) : -1;
    pthread_mutex_unlock(&g_lock);
    if (fd < 0) return CUDA_ERROR_INVALID_VALUE;
    *(int *)handle = fd;
    return CUDA_SUCCESS;
}
