#include "tnorm.h"

#define TN_STR_(x) #x
#define TN_XSTR_(x) TN_STR_(x)

const char *tn_version(void) {
  return TN_XSTR_(TNORM_VERSION_MAJOR) "." TN_XSTR_(TNORM_VERSION_MINOR) "." TN_XSTR_(TNORM_VERSION_PATCH);
}

const char *tn_status_name(tn_status status) {
  switch (status) {
#define TN_STATUS_NAME_(name, value, text) \
  case name:                               \
    return #name;
    TN_STATUS_TABLE(TN_STATUS_NAME_)
#undef TN_STATUS_NAME_
  }
  return "TN_UNKNOWN_STATUS";
}

const char *tn_status_string(tn_status status) {
  switch (status) {
#define TN_STATUS_TEXT_(name, value, text) \
  case name:                               \
    return text;
    TN_STATUS_TABLE(TN_STATUS_TEXT_)
#undef TN_STATUS_TEXT_
  }
  return "unknown status";
}
