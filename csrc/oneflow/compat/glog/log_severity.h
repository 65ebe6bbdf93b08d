// The one glog header that OneFlow 0.9.0's wheel leaves out. OneFlow's glog/logging.h includes it
// inside namespace google; it only needs the severity type and its values.
#ifndef ONEFLOW_ROPE_COMPAT_GLOG_LOG_SEVERITY_H_
#define ONEFLOW_ROPE_COMPAT_GLOG_LOG_SEVERITY_H_

typedef int LogSeverity;

const int GLOG_INFO = 0, GLOG_WARNING = 1, GLOG_ERROR = 2, GLOG_FATAL = 3, NUM_SEVERITIES = 4;

#ifndef GLOG_NO_ABBREVIATED_SEVERITIES
const int INFO = GLOG_INFO, WARNING = GLOG_WARNING, ERROR = GLOG_ERROR, FATAL = GLOG_FATAL;
#endif

#ifdef NDEBUG
#define DFATAL_LEVEL ERROR
#else
#define DFATAL_LEVEL FATAL
#endif

extern const char* const LogSeverityNames[NUM_SEVERITIES];

#endif  // ONEFLOW_ROPE_COMPAT_GLOG_LOG_SEVERITY_H_
