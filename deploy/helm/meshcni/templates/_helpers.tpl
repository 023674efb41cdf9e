{{/* Common labels. */}}
{{- define "meshcni.labels" -}}
app.kubernetes.io/name: meshcni
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: meshcni
{{- end }}

{{/* Ambient config dir on the host. */}}
{{- define "meshcni.ambientConfigDir" -}}
{{- default "/etc/ambient-config" .Values.ambient.configDir -}}
{{- end }}

{{/* Redirect modes this build of meshcni-agent has a driver for (cli::BUILT_REDIRECT_MODES;
     crates/agent/tests/manifests.rs keeps the two equal). With ambient on, any other mode fails
     the render instead of deploying agents that refuse to start. */}}
{{- define "meshcni.builtRedirectModes" -}}
iptables,inpod,ebpf
{{- end }}
{{- define "meshcni.checkRedirectMode" -}}
{{- $built := splitList "," (include "meshcni.builtRedirectModes" .) }}
{{- if and .Values.ambient.enabled (not (has .Values.ambient.redirectMode $built)) }}
{{- fail (printf "ambient.redirectMode=%s is not available in this build of meshcni (no %s driver); set ambient.redirectMode=inpod (or iptables)" .Values.ambient.redirectMode .Values.ambient.redirectMode) }}
{{- end }}
{{- end }}
