/* Declarations shared by cffi's cdef and the C compiler: no preprocessor directives here. */

struct nbdu_ring;
struct __kernel_timespec;

struct nbdu_ring *nbdu_ring_new(unsigned entries, unsigned flags, int *err);
void nbdu_ring_free(struct nbdu_ring *r);
int nbdu_register_eventfd(struct nbdu_ring *r, int efd, int async_only);
int nbdu_eventfd_enable(struct nbdu_ring *r, int enabled);
unsigned nbdu_cq_ready(struct nbdu_ring *r);
unsigned nbdu_cq_entries(struct nbdu_ring *r);
unsigned nbdu_sq_entries(struct nbdu_ring *r);
int nbdu_opcode_supported(struct nbdu_ring *r, int op);

int nbdu_prep_read(struct nbdu_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                   uint64_t user_data);
int nbdu_prep_write(struct nbdu_ring *r, int fd, const void *buf, unsigned len, uint64_t off,
                    uint64_t user_data, int rw_flags);
int nbdu_prep_write_linked_fsync(struct nbdu_ring *r, int fd, const void *buf, unsigned len,
                                 uint64_t off, uint64_t write_user_data,
                                 uint64_t fsync_user_data);
int nbdu_prep_fsync(struct nbdu_ring *r, int fd, unsigned fsync_flags, uint64_t user_data);
int nbdu_prep_fallocate(struct nbdu_ring *r, int fd, int mode, uint64_t off, uint64_t len,
                        uint64_t user_data);
int nbdu_prep_fadvise(struct nbdu_ring *r, int fd, uint64_t off, unsigned len, int advice,
                      uint64_t user_data);

int nbdu_prep_timeout(struct nbdu_ring *r, struct __kernel_timespec *ts, uint64_t ns,
                      uint64_t user_data);

int nbdu_submit(struct nbdu_ring *r);
int nbdu_get_events(struct nbdu_ring *r);
int nbdu_work_pending(struct nbdu_ring *r);
int nbdu_deferred(struct nbdu_ring *r);
int nbdu_reap(struct nbdu_ring *r, uint64_t *user_data, int32_t *res, unsigned max);
